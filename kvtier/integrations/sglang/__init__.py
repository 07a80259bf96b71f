"""SGLang integration: kvtier's tier chain as a HiCache storage backend (L3).

Load it with `--hicache-storage-backend dynamic` and the extra config
`{"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang.storage",
"class_name": "KVTierStorage", "interface_v1": 1, "kvtier": {...cache config...}}`.
This package imports SGLang only in `storage`, so `pages` and `chain` work without it.
"""
