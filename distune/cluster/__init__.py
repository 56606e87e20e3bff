"""The Ray layer: the only package that imports ray. Never imports distune.methods directly."""
