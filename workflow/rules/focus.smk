# In-focus slice selection: scores per brightfield plane for every site (per shard of wells), the
# chosen plane, a window of planes around it, and blur QC flags; one table and a heatmap per plate.


rule focus_shard:
    input:
        store=PLATE.store,
        layout=PLATE.layout,
        images=PLATE.images,
    output:
        table=temp(PLATE.focus_shard("{shard}")),
    params:
        **code_params("focus_shard.py"),
        n_shards=config["shards"],
        method=config["focus"]["method"],
        half_width=config["focus"]["half_width"],
    threads: config["threads"]["focus"]
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/focus_shard_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/focus_shard_{{shard}}.tsv"
    script:
        "../scripts/focus_shard.py"


rule focus_plate:
    input:
        tables=[PLATE.focus_shard(shard) for shard in SHARDS],
    output:
        table=PLATE.focus,
        figure=report(
            PLATE.focus_figure,
            caption="../report/focus.rst",
            category="Preprocessing",
            subcategory="{plate}",
            labels={"plate": "{plate}", "figure": "chosen plane"},
        ),
    params:
        **code_params("focus_plate.py"),
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/focus_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/focus_plate.tsv"
    script:
        "../scripts/focus_plate.py"
