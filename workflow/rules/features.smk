# Features: CellProfiler 5 headless measures every object of a shard of wells, real and virtual stains
# alike, in one call per shard (its start-up costs seconds); per-cell tables in parquet.


rule features_shard:
    input:
        unpack(features_inputs),
    output:
        cells=temp(f"{RESULTS}/plates/{{plate}}/features/shards/{{shard}}.parquet"),
        images=temp(f"{RESULTS}/plates/{{plate}}/features/shards/{{shard}}.images.parquet"),
        sites=temp(f"{RESULTS}/plates/{{plate}}/features/shards/{{shard}}.csv"),
    params:
        plate_dir=lambda wildcards: plate_dir(wildcards.plate),
        brightfield=config["channels"]["brightfield"],
        channels=config["channels"]["fluorescence"],
        sources=lambda wildcards: feature_sources(wildcards.plate),
        cellprofiler=CELLPROFILER,
        tile_pixels=FEATURES["tile_pixels"],
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
        cells=expand(f"{RESULTS}/plates/{{{{plate}}}}/features/shards/{{shard}}.parquet", shard=SHARDS),
        images=expand(f"{RESULTS}/plates/{{{{plate}}}}/features/shards/{{shard}}.images.parquet", shard=SHARDS),
        sites=expand(f"{RESULTS}/plates/{{{{plate}}}}/features/shards/{{shard}}.csv", shard=SHARDS),
    output:
        cells=f"{RESULTS}/plates/{{plate}}/features/cells.parquet",
        images=f"{RESULTS}/plates/{{plate}}/features/images.parquet",
        sites=f"{RESULTS}/plates/{{plate}}/features/sites.csv",
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/features_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/features_plate.tsv"
    script:
        "../scripts/features_plate.py"
