# Noise2Void: a blind-spot model trained on the noisy, illumination-corrected images themselves (per
# plate and channel, or per channel across the screen), then applied per shard of wells; the
# denoised channels form the plate's denoised.zarr (same HCS layout as images.zarr).


rule denoise_train_plate:
    input:
        unpack(n2v_training_inputs),
    output:
        model=PLATE.n2v_model("{channel}"),
    params:
        **code_params("denoise_train.py"),
        **N2V_TRAIN["params"],
    resources:
        gpu=1 if config["denoise"]["device"] == "cuda" else 0,
    threads: config["threads"]["denoise_train"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/denoise_train_{{channel}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/denoise_train_{{channel}}.tsv"
    script:
        "../scripts/denoise_train.py"


rule denoise_train_screen:
    input:
        unpack(n2v_training_inputs),
    output:
        model=f"{RESULTS}/models/n2v/{{channel}}.pt",
    params:
        **code_params("denoise_train.py"),
        **N2V_TRAIN["params"],
    resources:
        gpu=1 if config["denoise"]["device"] == "cuda" else 0,
    threads: config["threads"]["denoise_train"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/denoise_train_{{channel}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/denoise_train_{{channel}}.tsv"
    script:
        "../scripts/denoise_train.py"


rule denoise_assess:
    input:
        unpack(denoise_assess_inputs),
    output:
        assessment=PLATE.denoise_assessment,
    params:
        **code_params("denoise_assess.py"),
        channels=lambda wildcards: SCREEN.denoise_channels(wildcards.plate),
        apply=config["denoise"]["apply"],
        min_gain_db=config["denoise"]["min_gain_db"],
        seed=config["denoise"]["seed"],
        tile=config["denoise"]["tile"],
        device=config["denoise"]["device"],
    resources:
        gpu=1 if config["denoise"]["device"] == "cuda" else 0,
    threads: config["threads"]["denoise_predict"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/denoise_assess.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/denoise_assess.tsv"
    script:
        "../scripts/denoise_assess.py"


rule denoise_shard:
    input:
        unpack(denoise_shard_inputs),
    output:
        store=temp(directory(PLATE.denoise_shard("{shard}"))),
    params:
        **code_params("denoise_shard.py"),
        channels=lambda wildcards: SCREEN.denoise_channels(wildcards.plate),
        n_shards=config["shards"],
        tile=config["denoise"]["tile"],
        device=config["denoise"]["device"],
    resources:
        gpu=1 if config["denoise"]["device"] == "cuda" else 0,
    threads: config["threads"]["denoise_predict"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/denoise_shard_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/denoise_shard_{{shard}}.tsv"
    script:
        "../scripts/denoise_shard.py"


rule denoise_plate:
    input:
        stores=[PLATE.denoise_shard(shard) for shard in SHARDS],
        layout=PLATE.layout,
        assessment=PLATE.denoise_assessment,
    output:
        store=directory(PLATE.denoised),
    params:
        **code_params("denoise_plate.py"),
        channels=lambda wildcards: SCREEN.denoise_channels(wildcards.plate),
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/denoise_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/denoise_plate.tsv"
    script:
        "../scripts/denoise_plate.py"
