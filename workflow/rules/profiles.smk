# Profiles (pycytominer): a plate's cells -> annotated well profiles, normalised to the plate's negative
# controls, feature-selected and one consensus profile per treatment; the screen's from every plate's
# well profiles (each plate centred on its controls, scaled by the pooled controls of profiles.scale_by).


rule profiles_plate:
    input:
        cells=PLATE.features_cells,
        platemap=lambda wildcards: SCREEN.plate_row(wildcards.plate)["platemap"],
    output:
        **PLATE.profiles,
    params:
        **code_params("profiles_plate.py"),
        plate_info=lambda wildcards: SCREEN.plate_row(wildcards.plate),
        settings=config["profiles"],
        control_labels=config["platemap"]["control_types"],
    threads: config["threads"]["profiles"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/profiles_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/profiles_plate.tsv"
    script:
        "../scripts/profiles_plate.py"


rule profiles_screen:
    input:
        wells=[plate_folder(p).profile("wells") for p in SCREEN.plate_ids()],
    output:
        normalised=SCREEN_FOLDER.profile("normalised"),
        selected=SCREEN_FOLDER.profile("selected"),
        consensus=SCREEN_FOLDER.profile("consensus"),
    params:
        **code_params("profiles_screen.py"),
        settings=config["profiles"],
    threads: config["threads"]["profiles"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/screen/profiles_screen.log",
    benchmark:
        f"{RESULTS}/benchmarks/screen/profiles_screen.tsv"
    script:
        "../scripts/profiles_screen.py"
