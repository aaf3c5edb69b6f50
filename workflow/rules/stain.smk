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
        **code_params("stain_train.py"),
        plates=[SCREEN.plate_row(plate) for plate in STAIN_TRAINING_PLATES],
        sources=training_sources(),
        targets=lambda wildcards: STAIN_MODELS[wildcards.model],
        brightfield=config["channels"]["brightfield"],
        control_labels=config["platemap"]["control_types"],
        settings=STAIN["model"],
        train_wells=STAIN["train_wells"],
        validation_wells=STAIN["validation_wells"],
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
        unpack(stain_source_inputs(fluorescence=False)),
        models=stain_model_files(),
    output:
        store=temp(directory(PLATE.stain_shard("{shard}"))),
        sites=temp(PLATE.stain_shard_sites("{shard}")),
    params:
        **code_params("stain_shard.py"),
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
        stores=[PLATE.stain_shard(shard) for shard in SHARDS],
        sites=[PLATE.stain_shard_sites(shard) for shard in SHARDS],
        layout=PLATE.layout,
        models=stain_model_files(),
    output:
        store=directory(PLATE.virtual),
        sites=PLATE.stain_sites,
    params:
        **code_params("stain_plate.py"),
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
        unpack(stain_source_inputs(fluorescence=True)),
        virtual=PLATE.virtual,
        sites=PLATE.stain_sites,
        models=stain_model_files(),
    output:
        metrics=PLATE.stain_metrics,
        uncertainty=PLATE.stain_uncertainty,
        figure=report(
            PLATE.stain_examples,
            caption="../report/stain.rst",
            category="Virtual staining",
            subcategory="{plate}",
            labels={"plate": "{plate}", "figure": "examples"},
        ),
    params:
        **code_params("stain_evaluate.py"),
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
