"""Dataset acquisition: registry, fetch, extract, layouts, manifests; the ``dmf datasets`` view."""
