"""Which route answers a request: the routes file (TOML) loaded and validated, the route
table and its matching (namespace, host, path, default), and the routing snapshot that
SIGHUP swaps whole: per route table, the upstream client, credentials, realms and the
fetcher chain (the upstream behind the cache)."""
