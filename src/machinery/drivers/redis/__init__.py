"""Redis (`redis://`, `rediss://`, `redis+socket://`, Sentinel, Cluster): broker, result backend
and lock, with Go Machinery's keys and scripts.
"""
