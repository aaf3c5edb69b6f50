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
        **code_params("segment_train.py"),
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
        PLATE.segment_diameters,
    params:
        **code_params("segment_calibrate.py"),
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
        diameters=PLATE.segment_diameters,
    output:
        store=temp(directory(PLATE.segment_shard("{shard}"))),
        sites=temp(PLATE.segment_shard_sites("{shard}")),
    params:
        **code_params("segment_shard.py"),
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
        stores=[PLATE.segment_shard(shard) for shard in SHARDS],
        sites=[PLATE.segment_shard_sites(shard) for shard in SHARDS],
        virtual=PLATE.virtual,
        diameters=PLATE.segment_diameters,
    output:
        store=directory(PLATE.labels),
        sites=PLATE.segment_sites,
    params:
        **code_params("segment_plate.py"),
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
        labels=PLATE.labels,
        sites=PLATE.segment_sites,
    output:
        metrics=PLATE.segment_metrics,
        figure=report(
            PLATE.segment_overlay,
            caption="../report/segmentation.rst",
            category="Segmentation",
            subcategory="{plate}",
            labels={"plate": "{plate}", "figure": "overlays"},
        ),
    params:
        **code_params("segment_evaluate.py"),
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
