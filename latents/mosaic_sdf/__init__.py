"""Mosaic-SDF (Yariv et al., CVPR 2024, arXiv 2312.09222): 3D shapes as sets of local SDF grids.

representation  MosaicSDF (centres, half sides, k^3 values), tokens, the blended global SDF and its covered mask
mesh_sdf        pure-torch signed distance to a triangle mesh (negative inside)
build           mesh -> M-SDF: normalisation, farthest-point centres, common scale, fill, optional fine-tune
extract         M-SDF -> mesh: grid-major splatting, nearest-covered fill, marching cubes
normaliser      per-column standardisation pooled over rows
procedural      embedded procedural shape classes from trimesh primitives
space           the `mosaic-sdf` latent space and its config section latent.mosaic_sdf
"""
from latents.mosaic_sdf.representation import MosaicSDF, from_tokens, to_tokens, token_width
from latents.mosaic_sdf.space import MosaicSDFConfig, MosaicSDFSpace

__all__ = ["MosaicSDF", "MosaicSDFConfig", "MosaicSDFSpace", "from_tokens", "to_tokens", "token_width"]
