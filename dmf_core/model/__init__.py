"""The DMF model: image encoder, text encoder, shared fusion transformer, heads."""

