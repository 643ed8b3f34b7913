-- Per run: how many features never fire (dead) and how many are dense: relative, firing on more
-- than dense_factor x the run's mean firing rate (L0 / d_sae, k / d_sae for TopK: comparable
-- across k and width), and absolute, on more than dense_threshold of tokens (the paper's 1%,
-- which a TopK SAE with k / d_sae above 1% meets by arithmetic; see training.dense_fractions).
-- param run: stats run name; every run when omitted (default null)
-- param dense_factor double: multiple of the mean firing rate above which a feature is dense (default 10)
-- param dense_threshold double: token frequency above which a feature is dense, absolute rule (default 0.01)
with selected as (
    select
        *,
        avg(freq) over (partition by run) as mean_freq
    from features
    where $run is null or run = $run
),

counts as (
    select
        run,
        count(*) as n_features,
        count(*) filter (where n_fires = 0) as n_dead,
        any_value(mean_freq) as mean_freq,
        count(*) filter (where freq > $dense_factor * mean_freq) as n_dense,
        count(*) filter (where freq > $dense_threshold) as n_dense_abs
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
        $dense_factor * mean_freq as dense_threshold_rel,
        n_dense_abs,
        n_dense_abs / n_features as dense_frac_abs,
        $dense_threshold as dense_threshold
    from counts
    order by run
)

select * from final
