"""The flannel CNI plugin (standard library only) and a small CNI runtime driver."""
