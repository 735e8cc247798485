"""The scheduler process: continuous batching and forward passes on the model's device."""
