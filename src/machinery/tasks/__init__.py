"""Go Machinery's wire types: signatures and their typed arguments, task states and group records,
workflows (group, chord, chain), and the JSON that encodes them byte for byte as Go does."""
