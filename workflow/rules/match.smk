# Matching: kNN MoA / target matching (NSC, NSCB, top-k), replicate and MoA mAP (copairs), percent
# replicating, and the level-3 comparison of real and virtual features; per plate and for the screen.
# The virtual profiles are matched on the features that follow the real ones over the wells measured
# on both stain sources (brightpaint.match.match_profiles).


rule match_plate:
    input:
        selected=PLATE.profile("selected"),
        consensus=PLATE.profile("consensus"),
        normalised=[PLATE.profile("normalised")],
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
