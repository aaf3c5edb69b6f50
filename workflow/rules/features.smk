# Features: CellProfiler 5 headless measures every object of a shard of wells, real and virtual stains
# alike, in one call per shard (its start-up costs seconds); per-cell tables in parquet. The pipeline
# is built for the screen's channels (config features.pipeline: auto) unless the user gives one.


rule features_pipeline:
    output:
        **PIPELINES_TO_BUILD,
    params:
        **code_params("features_pipeline.py"),
        channels=FEATURES_CHANNELS,
        **CELLPROFILER,
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/features_pipeline.log",
    benchmark:
        f"{RESULTS}/benchmarks/features_pipeline.tsv"
    script:
        "../scripts/features_pipeline.py"


rule features_shard:
    input:
        unpack(features_inputs),
    output:
        cells=temp(PLATE.features_shard_cells("{shard}")),
        images=temp(PLATE.features_shard_images("{shard}")),
        sites=temp(PLATE.features_shard_sites("{shard}")),
    params:
        **code_params("features_shard.py"),
        brightfield=config["channels"]["brightfield"],
        channels=config["channels"]["fluorescence"],
        sources=lambda wildcards: feature_sources(wildcards.plate),
        **PIPELINE_FILES[1],
        **CELLPROFILER,
        tile_pixels=FEATURES["tile_pixels"],
        batch_megapixels=FEATURES["batch_megapixels"],
        n_shards=config["shards"],
    threads: config["threads"]["features"]
    conda:
        MAIN_ENV
    log:
        main=f"{RESULTS}/logs/{{plate}}/features_shard_{{shard}}.log",
        cellprofiler=f"{RESULTS}/logs/{{plate}}/features_shard_{{shard}}.cellprofiler.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/features_shard_{{shard}}.tsv"
    script:
        "../scripts/features_shard.py"


rule features_plate:
    input:
        cells=[PLATE.features_shard_cells(shard) for shard in SHARDS],
        images=[PLATE.features_shard_images(shard) for shard in SHARDS],
        sites=[PLATE.features_shard_sites(shard) for shard in SHARDS],
    output:
        cells=PLATE.features_cells,
        images=PLATE.features_images,
        sites=PLATE.features_sites,
    params:
        **code_params("features_plate.py"),
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/features_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/features_plate.tsv"
    script:
        "../scripts/features_plate.py"
