"""Write side: parse mmCIF files, pick origins, voxelize, and write the cache."""
__version__ = "0.1.0"
