"""DLKUNet models: ``DLKUNetS``, ``DLKUNetM``, ``DLKUNetL`` and the general ``DLKUNet``."""
from .blocks import LKA, Block, Down, DWConvBNAct, Up
from .checkpoints import convert_reference_state_dict, load_reference_checkpoint
from .dlkunet import VARIANTS, DLKUNet, DLKUNetL, DLKUNetM, DLKUNetS, build_model

__all__ = ["DLKUNet", "DLKUNetS", "DLKUNetM", "DLKUNetL", "VARIANTS", "build_model", "Block", "Down", "Up",
           "LKA", "DWConvBNAct", "convert_reference_state_dict", "load_reference_checkpoint"]
