-- Per run: how many features never fire (dead) and how many fire on more than a given share of
-- tokens (dense; the paper's threshold is 1%).
-- param run: stats run name; every run when omitted (default null)
-- param dense_threshold double: token frequency above which a feature is dense (default 0.01)
with selected as (
    select * from features
    where $run is null or run = $run
),

counts as (
    select
        run,
        count(*) as n_features,
        count(*) filter (where n_fires = 0) as n_dead,
        count(*) filter (where freq > $dense_threshold) as n_dense
    from selected
    group by run
),

final as (
    select
        run,
        n_features,
        n_dead,
        n_dead / n_features as dead_frac,
        n_dense,
        n_dense / n_features as dense_frac,
        $dense_threshold as dense_threshold
    from counts
    order by run
)

select * from final
