# Virtual staining: models trained on the screen's plates with real stains (role train/both), then
# every plate's brightfield -> virtual fluorescence channels (per shard of wells, assembled into the
# plate's virtual.zarr), and, on plates that have real stains too, the level-1 evaluation.


rule stain_train:
    input:
        unpack(stain_training_inputs),
    output:
        model=f"{RESULTS}/models/stain/{{model}}/model.safetensors",
        card=f"{RESULTS}/models/stain/{{model}}/card.json",
        history=f"{RESULTS}/models/stain/{{model}}/history.csv",
    wildcard_constraints:
        model="|".join(map(re.escape, STAIN_MODELS)),
    params:
        plates=[SCREEN.plate_row(plate) for plate in STAIN_TRAINING_PLATES],
        plate_dirs=[plate_dir(plate) for plate in STAIN_TRAINING_PLATES],
        targets=lambda wildcards: STAIN_MODELS[wildcards.model],
        brightfield=config["channels"]["brightfield"],
        settings=STAIN["model"],
        train_wells=STAIN["train_wells"],
        domain=STAIN["domain"],
        device=STAIN["device"],
    resources:
        gpu=1 if STAIN["device"] == "cuda" else 0,
    threads: config["threads"]["stain_train"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/stain_train_{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/stain_train_{{model}}.tsv"
    script:
        "../scripts/stain_train.py"


rule stain_shard:
    input:
        sources=lambda wildcards: plate_stain_sources(wildcards.plate, fluorescence=False),
        models=stain_model_files(),
    output:
        store=temp(directory(f"{RESULTS}/plates/{{plate}}/stain/shards/{{shard}}.zarr")),
        sites=temp(f"{RESULTS}/plates/{{plate}}/stain/shards/{{shard}}.csv"),
    params:
        plate_dir=lambda wildcards: plate_dir(wildcards.plate),
        brightfield=config["channels"]["brightfield"],
        n_shards=config["shards"],
        device=STAIN["device"],
        tile=STAIN["tile"],
        overlap=STAIN["overlap"],
        batch=STAIN["batch"],
        augmentations=STAIN["augmentations"],
        domain_check=STAIN["domain"]["check"],
    resources:
        gpu=1 if STAIN["device"] == "cuda" else 0,
    threads: config["threads"]["stain_predict"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/stain_shard_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/stain_shard_{{shard}}.tsv"
    script:
        "../scripts/stain_shard.py"


rule stain_plate:
    input:
        stores=expand(f"{RESULTS}/plates/{{{{plate}}}}/stain/shards/{{shard}}.zarr", shard=SHARDS),
        sites=expand(f"{RESULTS}/plates/{{{{plate}}}}/stain/shards/{{shard}}.csv", shard=SHARDS),
        layout=f"{RESULTS}/plates/{{plate}}/ingest/layout.json",
        models=stain_model_files(),
    output:
        store=directory(f"{RESULTS}/plates/{{plate}}/virtual.zarr"),
        sites=f"{RESULTS}/plates/{{plate}}/stain/sites.csv",
    params:
        augmentations=STAIN["augmentations"],
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/stain_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/stain_plate.tsv"
    script:
        "../scripts/stain_plate.py"


rule stain_evaluate:
    input:
        sources=lambda wildcards: plate_stain_sources(wildcards.plate),
        virtual=f"{RESULTS}/plates/{{plate}}/virtual.zarr",
        sites=f"{RESULTS}/plates/{{plate}}/stain/sites.csv",
        models=stain_model_files(),
    output:
        metrics=f"{RESULTS}/plates/{{plate}}/stain/metrics.parquet",
        uncertainty=f"{RESULTS}/plates/{{plate}}/stain/uncertainty.csv",
        figure=report(
            f"{RESULTS}/plates/{{plate}}/stain/examples.png",
            caption="../report/stain.rst",
            category="Virtual staining",
            subcategory="{plate}",
            labels={"plate": "{plate}", "figure": "examples"},
        ),
    params:
        plate_dir=lambda wildcards: plate_dir(wildcards.plate),
        brightfield=config["channels"]["brightfield"],
        eval_sites=STAIN["eval_sites"],
    threads: 1
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/stain_evaluate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/stain_evaluate.tsv"
    script:
        "../scripts/stain_evaluate.py"
