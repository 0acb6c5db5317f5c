"""Memcache (`memcache://`): result backend over aiomcache."""
