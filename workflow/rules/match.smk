# Matching: kNN MoA / target matching (NSC, NSCB, top-k), replicate and MoA mAP (copairs), percent
# replicating, and the level-3 comparison of real and virtual features; per plate and for the screen.
# The virtual profiles are matched on the features that follow their real counterparts on the plates
# that have both stain sources (rule match_virtual_features, once for the screen; kept like a model
# when one of those plates is rerun).


rule match_virtual_features:
    input:
        normalised=[
            kept_model_input(plate_folder(p).profile("normalised")) for p in PLATES_WITH_BOTH_SOURCES
        ],
    output:
        agreement=SCREEN_FOLDER.path("match/virtual_features.parquet"),
    params:
        **code_params("match_virtual_features.py"),
    threads: 1
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/screen/match_virtual_features.log",
    benchmark:
        f"{RESULTS}/benchmarks/screen/match_virtual_features.tsv"
    script:
        "../scripts/match_virtual_features.py"


rule match_plate:
    input:
        selected=PLATE.profile("selected"),
        consensus=PLATE.profile("consensus"),
        normalised=[PLATE.profile("normalised")],
        virtual_agreement=SCREEN_FOLDER.path("match/virtual_features.parquet"),
    output:
        **PLATE.matches,
    params:
        **code_params("match.py"),
        settings=config["match"],
    threads: 1
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/match_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/match_plate.tsv"
    script:
        "../scripts/match.py"


rule match_screen:
    input:
        selected=SCREEN_FOLDER.profile("selected"),
        consensus=SCREEN_FOLDER.profile("consensus"),
        normalised=[SCREEN_FOLDER.profile("normalised")],
        virtual_agreement=SCREEN_FOLDER.path("match/virtual_features.parquet"),
    output:
        **SCREEN_FOLDER.matches,
    params:
        **code_params("match.py"),
        settings=config["match"],
    threads: 1
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/screen/match_screen.log",
    benchmark:
        f"{RESULTS}/benchmarks/screen/match_screen.tsv"
    script:
        "../scripts/match.py"
