# Ingest: validate a plate's inputs, stream shards of wells into zarr, assemble the plate's
# OME-Zarr HCS store and its QC tables.


rule validate_plate:
    input:
        plate_inputs,
    output:
        images=PLATE.images,
        flags=PLATE.validation_flags,
        layout=PLATE.layout,
    params:
        **code_params("validate_plate.py"),
        manifest=plate_param("manifest"),
        platemap=plate_param("platemap"),
        role=plate_param("role"),
        screen_folder=SCREEN.sheet_folder,
        channels=config["channels"],
        on_missing=config["ingest"]["on_missing"],
        max_image_pixels=config["ingest"]["max_image_pixels"],
        max_planes=config["ingest"]["max_planes"],
        max_plate_bytes=config["ingest"]["max_plate_bytes"],
        control_labels=config["platemap"]["control_types"],
        **image_change_params(),
    threads: config["threads"]["validate"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/validate_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/validate_plate.tsv"
    script:
        "../scripts/validate_plate.py"


rule ingest_shard:
    input:
        images=rules.validate_plate.output.images,
        layout=rules.validate_plate.output.layout,
    output:
        store=temp(directory(PLATE.ingest_shard("{shard}"))),
        qc=temp(PLATE.ingest_shard_qc("{shard}")),
    params:
        **code_params("ingest_shard.py"),
        n_shards=config["shards"],
        saturation_flag=config["ingest"]["saturation_flag"],
        screen_folder=SCREEN.sheet_folder,
    threads: config["threads"]["ingest"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/ingest_shard_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/ingest_shard_{{shard}}.tsv"
    script:
        "../scripts/ingest_shard.py"


rule assemble_plate:
    input:
        stores=[PLATE.ingest_shard(shard) for shard in SHARDS],
        qc=[PLATE.ingest_shard_qc(shard) for shard in SHARDS],
        images=rules.validate_plate.output.images,
        flags=rules.validate_plate.output.flags,
        layout=rules.validate_plate.output.layout,
        manifest=plate_param("manifest"),
        platemap=plate_param("platemap"),
    output:
        store=directory(PLATE.store),
        qc_images=PLATE.qc_images,
        qc_sites=PLATE.qc_sites,
    params:
        **code_params("assemble_plate.py"),
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/assemble_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/assemble_plate.tsv"
    script:
        "../scripts/assemble_plate.py"
