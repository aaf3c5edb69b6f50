# Audit reports: one self-contained HTML page per plate (what went in, what came out, what was
# flagged, what produced it) and the screen's index page linking them.


rule report_plate:
    input:
        unpack(report_inputs),
    output:
        html=report(
            PLATE.report_html,
            caption="../report/plate_report.rst",
            category="Audit reports",
            labels={"plate": "{plate}"},
        ),
        summary=PLATE.report_json,
    params:
        **code_params("report_plate.py"),
        info=lambda wildcards: SCREEN.plate_row(wildcards.plate),
        rules=config["report"],
        # the settings (not the plate selection: running one plate must not make the others' reports stale)
        config={key: value for key, value in config.items() if key != "plates"},
        sheet=SCREEN.sheet,
        # a Path: not recorded (the workflow's folder moves with every clone), read for the git commit
        repo=Path(workflow.basedir),
        **PIPELINE_FILES[1],
        **CELLPROFILER,
        benchmarks=lambda wildcards: f"{RESULTS}/benchmarks/{wildcards.plate}",
        brightfield=config["channels"]["brightfield"],
        nuclei=config["channels"]["nuclei"],
    threads: 1
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/report_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/report_plate.tsv"
    script:
        "../scripts/report_plate.py"


rule report_index:
    input:
        summaries=[plate_folder(p).report_json for p in SCREEN.plate_ids()],
        screen=SCREEN_FOLDER.match("summary"),
        generalisation=generalisation_outputs(),
    output:
        f"{RESULTS}/index.html",
    params:
        **code_params("report_index.py"),
        # each summary's page, linked from the index
        reports=[plate_folder(p).report_html for p in SCREEN.plate_ids()],
        generalisation_skipped=GENERALISATION_SKIPPED,
    threads: 1
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/screen/report_index.log",
    benchmark:
        f"{RESULTS}/benchmarks/screen/report_index.tsv"
    script:
        "../scripts/report_index.py"
