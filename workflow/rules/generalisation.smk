# Generalisation matrix of virtual staining: one model per group of wells with real stains (cell type x
# phenotype group), each tested on every group's held-out wells at the three evaluation levels, as
# differences to the in-distribution model. Screen-level; on when config generalisation.enabled and the
# screen's training plates give at least two groups.


rule generalisation_train:
    input:
        unpack(stain_training_inputs),
    output:
        model=f"{RESULTS}/generalisation/{{group}}/model.safetensors",
        card=f"{RESULTS}/generalisation/{{group}}/card.json",
        history=f"{RESULTS}/generalisation/{{group}}/history.csv",
    wildcard_constraints:
        group="|".join(map(re.escape, GENERALISATION_GROUPS)),
    params:
        **code_params("generalisation_train.py"),
        group=lambda wildcards: GENERALISATION_GROUPS[wildcards.group],
        plates=[SCREEN.plate_row(plate) for plate in STAIN_TRAINING_PLATES],
        sources=training_sources(),
        targets=SCREEN.stain_targets(),
        brightfield=config["channels"]["brightfield"],
        control_labels=config["platemap"]["control_types"],
        settings=GENERALISATION_SETTINGS,
        domain=STAIN["domain"],
        device=STAIN["device"],
    resources:
        gpu=1 if STAIN["device"] == "cuda" else 0,
    threads: config["threads"]["generalisation"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/generalisation/train_{{group}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/generalisation/train_{{group}}.tsv"
    script:
        "../scripts/generalisation_train.py"


rule generalisation_evaluate:
    input:
        unpack(generalisation_evaluation_inputs),
    output:
        f"{RESULTS}/generalisation/{{group}}/metrics.parquet",
    wildcard_constraints:
        group="|".join(map(re.escape, GENERALISATION_GROUPS)),
    params:
        **code_params("generalisation_evaluate.py"),
        groups=list(GENERALISATION_GROUPS),
        sources=training_sources(),
        brightfield=config["channels"]["brightfield"],
        control_labels=config["platemap"]["control_types"],
        nuclei=config["channels"]["nuclei"],
        segment=SEGMENT,
        **NUCLEI_WEIGHTS[1],
        test_sites=GENERALISATION["test_sites"],
        device=STAIN["device"],
        tile=STAIN["tile"],
        overlap=STAIN["overlap"],
    resources:
        gpu=1 if STAIN["device"] == "cuda" else 0,
    threads: config["threads"]["generalisation"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/generalisation/evaluate_{{group}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/generalisation/evaluate_{{group}}.tsv"
    script:
        "../scripts/generalisation_evaluate.py"


rule generalisation_matrix:
    input:
        [f"{RESULTS}/generalisation/{group}/metrics.parquet" for group in GENERALISATION_GROUPS],
    output:
        matrix=f"{RESULTS}/generalisation/matrix.parquet",
        figure=report(
            f"{RESULTS}/generalisation/matrix.png",
            caption="../report/generalisation.rst",
            category="Virtual staining",
            subcategory="generalisation",
        ),
    params:
        **code_params("generalisation_matrix.py"),
    threads: 1
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/generalisation/matrix.log",
    benchmark:
        f"{RESULTS}/benchmarks/generalisation/matrix.tsv"
    script:
        "../scripts/generalisation_matrix.py"
