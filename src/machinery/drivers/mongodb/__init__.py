"""MongoDB (`mongodb://`, `mongodb+srv://`): result backend over pymongo's asyncio client, Go Machinery's documents."""
