"""Single-cell features with CellProfiler 5, from images and label masks (main environment side).

CellProfiler lives in its own environment (`.venv-cellprofiler`: numpy < 2, no pandas, no
brightpaint); this package talks to it through files only:

1. `runner.write_site_inputs` writes one site's channels as uint16 TIFFs (camera-like ADU, clipped to
   0..65535 and rounded; CellProfiler rescales uint16 by 1/65535, so its intensities are ADU/65535)
   and its label images as uint16 TIFFs, and returns the site's LoadData row.
2. `runner.write_loaddata` writes the rows of a batch as one LoadData CSV.
3. `runner.run_cellprofiler` runs the pipeline (`resources/cellprofiler/features.cppipe`, built by
   `cellprofiler_pipeline.py`) headless on the whole batch in one process -- CellProfiler takes
   ~3 s to start, so sites are batched:
       cellprofiler -c -r -p PIPE --data-file CSV -o OUT -i IN -t TMP -L WARNING -e imageio_reader
   (`-e imageio_reader` keeps Bio-Formats, which would try to download Java, out), with OMP /
   OpenBLAS / MKL / numba threads capped.
4. `tables.read_object_tables` turns ExportToSpreadsheet's `Image.csv`, `Nuclei.csv`, `Cells.csv`,
   `Cytoplasm.csv` into one row per cell and one row per site.
5. `extract.extract_features` does all of it for a list of sites and reports the sites it could
   not use. With a tiled pipeline beside the site-by-site one (the workflow's default:
   `pipelines.SITE_PIPELINE` and `TILED_PIPELINE`, the two halves of `PIPELINE`), the per-object
   modules that see only the object's own pixels run on tiles of several sites (`tiles.tile_sites`,
   `untile_cells`, `join_parts`), because CellProfiler's cost is mostly per image set and
   measurement column, not per pixel.

Tables (see `tables.read_object_tables`):

* cells: `Metadata_Plate, Metadata_Well, Metadata_Site, Metadata_Source, Metadata_ObjectNumber`
  (the label value, shared by nucleus k, cell k and cytoplasm k), position columns moved to
  metadata (`Metadata_<Objects>_AreaShape_Center_X`, ..._BoundingBoxMinimum_X, ...), neighbour
  object numbers as label values in metadata (`Metadata_Cells_Neighbors_FirstClosestObjectNumber_
  Adjacent`, ...), then every feature as CellProfiler names it with the object prefix
  (`Nuclei_AreaShape_Area`, `Cells_Intensity_MeanIntensity_DNA`, `Cytoplasm_Texture_..._3_00_256`).
  Dropped: ImageNumber, ObjectNumber (replaced), `Number_Object_Number`, and `Location_*`
  (`Location_Center_*` repeats AreaShape_Center; CenterMassIntensity / MaxIntensity locations are
  absolute pixel positions, not features). Compartments are joined on (site, label value) with an
  outer join: a cell lacking a compartment (a cell that is all nucleus has no cytoplasm) keeps its
  row with NaN for that compartment's features.
* images: the same site metadata, then `Image_<feature>` for CellProfiler's per-image
  measurements of the kinds `Count_`, `ImageQuality_`, `Granularity_`, `Texture_`, `Intensity_`,
  `Correlation_`, `Threshold_` (file names, MD5s, execution times and the per-image object
  aggregates Mean_/Median_/Min_/Max_/StDev_ are left out).

CellProfiler numbers the objects of a label image 1..n in the order of their label values (its
loader renumbers every label image that way), so ObjectNumber is mapped back to our label value
through the label files the Image table names; the label files must still exist when the tables are
read (they do inside `extract_features`).

Modules: `schema` (names the others share: default channels and objects, table keys,
FeatureError), `runner` (a site's inputs, the LoadData CSV, running CellProfiler headless),
`pipelines` (the shipped pipelines, the channels and objects a pipeline measures, building one),
`cellprofiler_pipeline` (the builder itself, run by path under the CellProfiler environment's
Python), `tables` (CellProfiler's CSVs into tables; stacking shards), `tiles` (several sites as one
image set and back) and `extract` (all of it for a batch of sites; a workflow plate's readers).
"""
