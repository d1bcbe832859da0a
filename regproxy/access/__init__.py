"""Who may pull what: the proxy's own users, tokens, workload identities and rate limits."""
