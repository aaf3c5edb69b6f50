# In-focus slice selection: scores per brightfield plane for every site (per shard of wells), the
# chosen plane, a window of planes around it, and blur QC flags; one table and a heatmap per plate.


rule focus_shard:
    input:
        store=f"{RESULTS}/plates/{{plate}}/images.zarr",
        layout=f"{RESULTS}/plates/{{plate}}/ingest/layout.json",
    output:
        table=temp(f"{RESULTS}/plates/{{plate}}/focus/shards/{{shard}}.parquet"),
    params:
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
        tables=expand(f"{RESULTS}/plates/{{{{plate}}}}/focus/shards/{{shard}}.parquet", shard=SHARDS),
    output:
        table=f"{RESULTS}/plates/{{plate}}/focus.parquet",
        figure=report(
            f"{RESULTS}/plates/{{plate}}/focus.png",
            caption="../report/focus.rst",
            category="Preprocessing",
            subcategory="{plate}",
            labels={"plate": "{plate}", "figure": "chosen plane"},
        ),
    conda:
        MAIN_ENV
    log:
        f"{RESULTS}/logs/{{plate}}/focus_plate.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{plate}}/focus_plate.tsv"
    script:
        "../scripts/focus_plate.py"
