"""Synthetic chest-CT phantom written in the MedSeg "COVID-19 CT segmentation" file layout.

This package owns the project's embedded default dataset. No real CT can be shipped, so it
simulates patients (body wall, ribs, spine, mediastinum, heart, great vessels, two lungs with
branching vessels and airways, diaphragm domes) in millimetres, adds COVID-19 findings
(ground-glass opacities, consolidation, pleural effusion) as 3D blobs, renders slices in
Hounsfield units with a scanner blur, slab partial volume and noise, and writes them exactly as
MedSeg ships its data.

Modules:
  tubes      straight cylinders: the primitive, space-filling vessel trees, drawing into slices
  anatomy    the patient model in mm: shapes, CT numbers, vessel and airway trees
  lesions    findings: ground-glass / consolidation blobs and pleural fluid
  render     mm -> pixels: tubes, anatomy per slice, compositing, scanner blur and noise
  generate   `generate_slice`, `generate_volume` (display orientation)
  medseg     the MedSeg files, phantom.json and the command line

  python -m tvunet_jax.phantom --out data/medseg_phantom [--seed 0] [--tr-slices 100] ...
"""

from __future__ import annotations

from tvunet_jax.phantom.anatomy import LEFT_LUNG, RIGHT_LUNG, Tissue
from tvunet_jax.phantom.generate import generate_slice, generate_volume
from tvunet_jax.phantom.lesions import BACKGROUND, CONSOLIDATION, GROUND_GLASS, PLEURAL_EFFUSION
from tvunet_jax.phantom.medseg import (
  GENERATOR_VERSION,
  PROVENANCE,
  RP_IMAGE_DIR,
  RP_LUNG_DIR,
  RP_MASK_DIR,
  STORAGE_ROT90_K,
  TR_IMAGE,
  TR_LUNG,
  TR_MASK,
  affine_for,
  from_storage,
  main,
  to_storage,
  write_medseg_phantom,
)
from tvunet_jax.phantom.render import HU_MAX, HU_MIN, Phantom

__all__ = [
  "BACKGROUND",
  "CONSOLIDATION",
  "GENERATOR_VERSION",
  "GROUND_GLASS",
  "HU_MAX",
  "HU_MIN",
  "LEFT_LUNG",
  "PLEURAL_EFFUSION",
  "PROVENANCE",
  "RIGHT_LUNG",
  "RP_IMAGE_DIR",
  "RP_LUNG_DIR",
  "RP_MASK_DIR",
  "STORAGE_ROT90_K",
  "TR_IMAGE",
  "TR_LUNG",
  "TR_MASK",
  "Phantom",
  "Tissue",
  "affine_for",
  "from_storage",
  "generate_slice",
  "generate_volume",
  "main",
  "to_storage",
  "write_medseg_phantom",
]
