"""Data: sources of training slices (HDF5, the seed's npy files, synthetic) and the input pipeline."""
