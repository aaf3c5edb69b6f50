# Matching: kNN MoA / target matching (NSC, NSCB, top-k), replicate and MoA mAP (copairs), percent
# replicating, and the level-3 comparison of real and virtual features; per plate and for the screen.


rule match_plate:
    input:
        selected=f"{RESULTS}/plates/{{plate}}/profiles/selected.parquet",
        consensus=f"{RESULTS}/plates/{{plate}}/profiles/consensus.parquet",
        normalised=[f"{RESULTS}/plates/{{plate}}/profiles/normalised.parquet"],
    output:
        **match_files(f"{RESULTS}/plates/{{plate}}"),
    params:
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
        selected=f"{SCREEN_DIR}/profiles/selected.parquet",
        consensus=f"{SCREEN_DIR}/profiles/consensus.parquet",
        normalised=[plate_profile_files(p)["normalised"] for p in SCREEN.plate_ids()],
    output:
        **match_files(SCREEN_DIR),
    params:
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
