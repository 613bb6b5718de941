"""MONAI Label–compatible API: the MONAI Label plugins of 3D Slicer and OHIF work unmodified.

:func:`monailabel_routers` gives the routes (:mod:`.routes`) at the server's root (the default
dataset) and at ``/monailabel/{dataset_id}`` (any dataset). The mapping onto segassist:

- app = dataset (:mod:`.apps`); image ids are segassist ids, or the names clients gave;
- labels a viewer saves become sparse labels (:mod:`.sparse`) stored as label versions;
- the ``segmentation`` trainer is the assist workflow (:mod:`.training`);
- ``infer`` serves the newest segmenter's prediction (or has a worker make it) as NRRD in the
  viewer's LPS world (:mod:`.inference`, :mod:`.volumes`);
- strategies ``random``, ``first``, ``uncertainty`` (:mod:`.strategies`); sessions
  (:mod:`.sessions`).
"""

from __future__ import annotations

from segassist.server.monailabel.routes import monailabel_routers

__all__ = ["monailabel_routers"]
