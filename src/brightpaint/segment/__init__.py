"""Segmentation with Cellpose 3: nuclei (DNA channel) and cells (cell-body channel + nuclei).

Weights never come from the network. Cellpose's named models (`nuclei`, `cyto3`, `cpsam`, ...)
download at run time, and `CellposeModel()` built without weights silently runs random ones, so
`load_cellpose_model` takes a weight file only, checks that it is a complete Cellpose state dict (a
partial or foreign file would otherwise load with strict=False and leave random layers), reads the
network's widths from the file, and loads it strictly. The project ships small reduced networks
(widths 16-32-64-128) trained from scratch on the demo generator's images (`train.train_cellpose_model`,
driven by `brightpaint.demo.cellpose_weights`, rule `segment_train`); a user's own Cellpose weights
(e.g. a cyto3 copy) load the same way.

Inputs follow Cellpose's two-channel convention: nuclei model = (DNA, zeros), cell model = (cell
body, DNA). Each channel is scaled to its 1st-99th percentile (Cellpose's own normalisation), then
optionally gamma-corrected (the virtual-staining literature used 0.3), by one function for training
and prediction alike.

After Cellpose: size filters, then `relate_objects` makes the compartments CellProfiler expects: one
nucleus per cell (the nucleus that overlaps the cell most), nuclei clipped to their cell, cytoplasm =
cell minus nucleus, the three label images sharing object numbers. Cells without a nucleus and nuclei
without a cell are dropped and counted; objects touching the image border are dropped as a pair
(their features would be biased), by default.

Modules: `settings` (SegmentSettings, SegmentError), `weights` (weight files, the reduced network,
loading, descriptions), `run` (input scaling, site quality, Cellpose at a diameter, diameter
estimation, Segmenter), `objects` (size filter, border, relating nuclei and cells, consecutive
labels), `plates` (a plate's readers, calibration and shards), `evaluate` (instance metrics, truth,
summaries, overlay figure) and `train` (training a network from scratch).
"""
