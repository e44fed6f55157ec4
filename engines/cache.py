"""Engine cache keys: the contract the runtime checks plans against lives in `latentrt.cache_keys`."""

from latentrt.cache_keys import KEY_SCHEMA, cache_key, canonical_json, check_engine, digest, key_fields

__all__ = ["KEY_SCHEMA", "cache_key", "canonical_json", "check_engine", "digest", "key_fields"]
