"""One module per op: the public function, its ``torch.library`` op, kernels and autograd."""
