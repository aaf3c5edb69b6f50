# Illumination correction: one function per plate and channel, from all (or a bounded sample of)
# the plate's sites. Later stages apply it as (image - dark) / flat where they read images.


rule illumination:
    input:
        store=PLATE.store,
        layout=PLATE.layout,
    output:
        function=PLATE.illum("{channel}"),
        meta=PLATE.illum_meta("{channel}"),
        figure=report(
            PLATE.illum_figure("{channel}"),
            caption="../report/illumination.rst",
            category="Preprocessing",
            subcategory="{plate}",
            labels={"plate": "{plate}", "figure": "illumination {channel}"},
        ),
    params:
        **code_params("illumination.py"),
        method=config["illumination"]["method"],
        max_sites=config["illumination"]["max_sites"],
        dark=config["illumination"]["dark"],
        fluorescence_average=config["illumination"]["fluorescence_average"],
    threads: config["threads"]["illumination"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/illumination_{{channel}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/illumination_{{channel}}.tsv"
    script:
        "../scripts/illumination.py"
