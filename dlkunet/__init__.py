"""dlkunet: DLKUNet, a lightweight U-Net for medical image segmentation, with fused kernels."""
__version__ = "0.1.0"
