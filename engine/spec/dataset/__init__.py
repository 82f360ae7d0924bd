"""The dataset as the app and the engine both read it, without torch: the musubi-tuner TOML schema, the items on
disk, the plan (sizes, buckets, problems), the check report and the cache files' names, fingerprints and status."""
