"""unet-hvd: Horovod data-parallel 2D U-Net for BraTS."""
__version__ = "0.1.0"
