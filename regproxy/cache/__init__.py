"""The pull-through cache: a fetcher decorator (``fetcher.CachingFetcher``) over any other
fetcher, its long-lived state (``fetcher.Cache``), who may read what (``access``), content-
addressed objects on disk with verified, coalesced downloads and zero-copy serving. It
knows the upstream only through the fetch interface it wraps."""
