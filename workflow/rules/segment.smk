# Segmentation: Cellpose nuclei and cells on every plate's virtual stains and, where a plate has them,
# on its real stains; labels in the plate's labels.zarr, and the level-2 evaluation (virtual vs real,
# and vs ground truth where truth masks exist).


rule segment_train:
    output:
        weights=f"{RESULTS}/models/cellpose/{{kind}}.pth",
        card=f"{RESULTS}/models/cellpose/{{kind}}.json",
    wildcard_constraints:
        kind="nuclei|cells",
    params:
        settings=SEGMENT["train"],
    resources:
        gpu=1 if SEGMENT["device"] == "cuda" else 0,
    threads: config["threads"]["segment"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/segment_train_{{kind}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment_train_{{kind}}.tsv"
    script:
        "../scripts/segment_train.py"


rule segment_calibrate:
    input:
        unpack(segment_inputs),
    output:
        f"{RESULTS}/plates/{{plate}}/segment/diameters.json",
    params:
        **SEGMENT_PARAMS,
    resources:
        gpu=1 if SEGMENT["device"] == "cuda" else 0,
    threads: config["threads"]["segment"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/segment_calibrate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/segment_calibrate.tsv"
    script:
        "../scripts/segment_calibrate.py"


rule segment_shard:
    input:
        unpack(segment_inputs),
        diameters=f"{RESULTS}/plates/{{plate}}/segment/diameters.json",
    output:
        store=temp(directory(f"{RESULTS}/plates/{{plate}}/segment/shards/{{shard}}.zarr")),
        sites=temp(f"{RESULTS}/plates/{{plate}}/segment/shards/{{shard}}.csv"),
    params:
        **SEGMENT_PARAMS,
        n_shards=config["shards"],
        sites_per_batch=SEGMENT["sites_per_batch"],
    resources:
        gpu=1 if SEGMENT["device"] == "cuda" else 0,
    threads: config["threads"]["segment"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/segment_shard_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/segment_shard_{{shard}}.tsv"
    script:
        "../scripts/segment_shard.py"


rule segment_plate:
    input:
        stores=expand(f"{RESULTS}/plates/{{{{plate}}}}/segment/shards/{{shard}}.zarr", shard=SHARDS),
        sites=expand(f"{RESULTS}/plates/{{{{plate}}}}/segment/shards/{{shard}}.csv", shard=SHARDS),
        virtual=f"{RESULTS}/plates/{{plate}}/virtual.zarr",
        diameters=f"{RESULTS}/plates/{{plate}}/segment/diameters.json",
    output:
        store=directory(f"{RESULTS}/plates/{{plate}}/labels.zarr"),
        sites=f"{RESULTS}/plates/{{plate}}/segment/sites.csv",
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/segment_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/segment_plate.tsv"
    script:
        "../scripts/segment_plate.py"


rule segment_evaluate:
    input:
        unpack(segment_inputs),
        labels=f"{RESULTS}/plates/{{plate}}/labels.zarr",
        sites=f"{RESULTS}/plates/{{plate}}/segment/sites.csv",
    output:
        metrics=f"{RESULTS}/plates/{{plate}}/segment/metrics.parquet",
        figure=report(
            f"{RESULTS}/plates/{{plate}}/segment/overlay.png",
            caption="../report/segmentation.rst",
            category="Segmentation",
            subcategory="{plate}",
            labels={"plate": "{plate}", "figure": "overlays"},
        ),
    params:
        **SEGMENT_PARAMS,
        truth_masks=lambda wildcards: SEGMENT["truth_masks"],
    threads: 1
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/segment_evaluate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/segment_evaluate.tsv"
    script:
        "../scripts/segment_evaluate.py"
