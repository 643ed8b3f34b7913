-- log10 firing frequency against log10 mean value (when firing) for every live feature: the
-- points of the paper's frequency / value scatter plot.
-- param run: stats run name; every run when omitted (default null)
with live as (
    select * from features
    where not is_dead
        and ($run is null or run = $run)
),

final as (
    select
        run,
        feature,
        log10_freq,
        log10_mean_act,
        freq_images,
        max_act
    from live
    order by
        run,
        feature
)

select * from final
