"""One-pass kernels for the single neuron's update: the C kernel for CPUs (compiled on first use), the Triton
kernel for CUDA, and the one dispatch between them and the reference path. Torch only."""
