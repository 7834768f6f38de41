"""Dataset acquisition for ``download``: registry, fetch, extract, layouts, manifests."""
