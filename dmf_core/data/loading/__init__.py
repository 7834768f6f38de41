"""Loading: datasets over the packed store, the P x K identity sampler, augmentation."""
