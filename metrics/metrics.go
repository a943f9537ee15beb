// Package metrics exposes what stsmap does as Prometheus metrics, and a
// health check, on an HTTP listener of its own (SPEC section 8).
//
// Metrics receives events from the packages that do the work, through
// hooks those packages declare: policycache.Observer (cache hits, misses,
// discoveries, refreshes, store errors), socketmap.Server.ConnState and
// policymap.Handler.Observe (lookups by answer, with their latency). The
// gauges of cached policies are computed from policycache.Stats at each
// scrape. Among them is stsmap_policies_refresh_failing_over_a_day: RFC
// 8461 §10.2 asks to alert when a policy cannot be refreshed for a long
// time, since an attacker may be blocking the refresh until the policy
// expires; postfix-snippets/stsmap-alerts.yml has the alert rule.
//
// Every label value comes from a fixed set known here; anything else is
// counted under "other", so that no caller, and no remote party, can grow
// the number of series.
package metrics

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"stsmap/policycache"
	"stsmap/policymap"
	"stsmap/resolver"
)

const namespace = "stsmap"

// otherLabel counts a label value outside the fixed set.
const otherLabel = "other"

// Label value sets.
var (
	answers = []string{
		policymap.AnswerEnforce, policymap.AnswerTesting, policymap.AnswerNone, policymap.AnswerNoPolicy,
		policymap.AnswerDane, policymap.AnswerDaneOnly, policymap.AnswerTemp,
	}
	discoveryOutcomes = []string{
		string(policycache.ReasonPolicy), string(policycache.ReasonNoRecord),
		string(policycache.ReasonInvalidRecord), string(policycache.ReasonDNSFailure),
		string(policycache.ReasonInvalidPolicy),
		// resolver.FetchErrorClass, "invalid_policy" aside.
		policycache.DiscoveryFetchErrorPrefix + "dns",
		policycache.DiscoveryFetchErrorPrefix + "connect",
		policycache.DiscoveryFetchErrorPrefix + "tls",
		policycache.DiscoveryFetchErrorPrefix + "timeout",
		policycache.DiscoveryFetchErrorPrefix + "status",
		policycache.DiscoveryFetchErrorPrefix + "redirect",
		policycache.DiscoveryFetchErrorPrefix + "content_type",
		policycache.DiscoveryFetchErrorPrefix + "too_large",
		policycache.DiscoveryFetchErrorPrefix + "other",
	}
	refreshOutcomes = []string{
		policycache.RefreshRenewed, policycache.RefreshIDChanged, policycache.RefreshRenewedHTTPS,
		policycache.RefreshFailed, policycache.RefreshBackoff, policycache.RefreshKept,
		policycache.RefreshAdopted, policycache.RefreshNotClaimed,
		policycache.RefreshDroppedIdle, policycache.RefreshDroppedExpired,
	}
	storeOps = []string{
		policycache.StoreOpLoad, policycache.StoreOpGet, policycache.StoreOpPut,
		policycache.StoreOpDelete, policycache.StoreOpClaim,
	}
	modes = []string{string(resolver.ModeEnforce), string(resolver.ModeTesting), string(resolver.ModeNone)}
)

// lookupBuckets span a cache hit (tens of microseconds) to a discovery
// that waits out the first-contact timeout (seconds).
var lookupBuckets = []float64{
	0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
	0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
	0.1, 0.25, 0.5, 1, 2.5, 5, 10,
}

// Metrics holds stsmap's metrics, on a registry of its own. Its methods are
// safe for concurrent use.
type Metrics struct {
	reg *prometheus.Registry

	lookups        fixedCounter
	lookupDuration prometheus.Histogram
	cacheHits      prometheus.Counter
	cacheMisses    prometheus.Counter
	discoveries    fixedCounter
	refreshes      fixedCounter
	idChanges      prometheus.Counter
	refreshFails   prometheus.Counter
	storeErrors    fixedCounter
	conns          prometheus.Gauge
	connsTotal     prometheus.Counter
}

var _ policycache.Observer = (*Metrics)(nil)

// New returns the metrics, registered with the Go and process collectors.
// stats, when not nil, is called at each scrape for the gauges of cached
// policies (policycache.Cache.Stats).
func New(stats func() policycache.Stats) *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		reg: reg,
		lookups: newFixedCounter(reg, prometheus.CounterOpts{Namespace: namespace, Name: "lookups_total",
			Help: "Lookups answered, by answer: enforce, testing (strict testing), none (mode none), no_policy (every other NOTFOUND), dane, dane-only, temp."},
			"answer", answers),
		lookupDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Name: "lookup_duration_seconds",
			Help: "Time to answer a lookup.", Buckets: lookupBuckets}),
		cacheHits: prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "cache_hits_total",
			Help: "Policy cache lookups answered from an unexpired entry."}),
		cacheMisses: prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "cache_misses_total",
			Help: "Policy cache lookups that started or joined a discovery."}),
		discoveries: newFixedCounter(reg, prometheus.CounterOpts{Namespace: namespace, Name: "discoveries_total",
			Help: "MTA-STS discoveries, by outcome: policy, no_record, invalid_record, dns_failure, invalid_policy, fetch_error_<class>."},
			"outcome", discoveryOutcomes),
		refreshes: newFixedCounter(reg, prometheus.CounterOpts{Namespace: namespace, Name: "refreshes_total",
			Help: "Background refreshes of cached policies, by outcome."},
			"outcome", refreshOutcomes),
		idChanges: prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "policy_id_changes_total",
			Help: "Refreshes that found a new policy id and fetched its policy."}),
		refreshFails: prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "refresh_failures_total",
			Help: "Refreshes that failed; the cached policy is kept until it expires."}),
		storeErrors: newFixedCounter(reg, prometheus.CounterOpts{Namespace: namespace, Name: "store_errors_total",
			Help: "Failed policy store operations, by operation."},
			"op", storeOps),
		conns: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "socketmap_connections",
			Help: "Socketmap connections open."}),
		connsTotal: prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "socketmap_connections_total",
			Help: "Socketmap connections accepted."}),
	}
	reg.MustRegister(m.lookupDuration, m.cacheHits, m.cacheMisses, m.idChanges, m.refreshFails, m.conns, m.connsTotal,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if stats != nil {
		reg.MustRegister(newStatsCollector(stats))
	}
	return m
}

// CacheHit implements policycache.Observer.
func (m *Metrics) CacheHit() { m.cacheHits.Inc() }

// CacheMiss implements policycache.Observer.
func (m *Metrics) CacheMiss() { m.cacheMisses.Inc() }

// Discovery implements policycache.Observer.
func (m *Metrics) Discovery(outcome string) { m.discoveries.inc(outcome) }

// Refresh implements policycache.Observer.
func (m *Metrics) Refresh(outcome string) {
	m.refreshes.inc(outcome)
	switch outcome {
	case policycache.RefreshIDChanged:
		m.idChanges.Inc()
	case policycache.RefreshFailed:
		m.refreshFails.Inc()
	}
}

// StoreError implements policycache.Observer.
func (m *Metrics) StoreError(op string) { m.storeErrors.inc(op) }

// ConnState counts socketmap connections; it is a socketmap.Server's
// ConnState.
func (m *Metrics) ConnState(delta int) {
	m.conns.Add(float64(delta))
	if delta > 0 {
		m.connsTotal.Add(float64(delta))
	}
}

// ObserveLookup counts a lookup and its latency; it is a policymap.Handler's
// Observe.
func (m *Metrics) ObserveLookup(answer string, d time.Duration) {
	m.lookups.inc(answer)
	m.lookupDuration.Observe(d.Seconds())
}

// Handler serves /metrics and /healthz. /healthz answers 200 "ok" once
// ready returns true (the daemon's listeners are up; its store may still be
// loading, lookups read it directly meanwhile), 503 "starting" before; a
// nil ready counts as ready.
func (m *Metrics) Handler(ready func() bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.InstrumentMetricHandler(m.reg,
		promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
			Registry:            m.reg, // counts its own errors
			ErrorHandling:       promhttp.ContinueOnError,
			MaxRequestsInFlight: 4,
			Timeout:             10 * time.Second,
		})))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if ready != nil && !ready() {
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte("starting\n"))
			return
		}
		w.Write([]byte("ok\n"))
	})
	return mux
}

// Timeouts of the metrics listener: a scrape is small and local.
const (
	readHeaderTimeout = 5 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 2 * time.Minute
	shutdownTimeout   = 5 * time.Second
)

// Serve listens on addr and serves h until ctx ends, then shuts the server
// down, letting scrapes in flight finish for a few seconds. It returns nil
// after a shutdown, or the error that stopped it, such as one from
// listening.
func Serve(ctx context.Context, addr string, h http.Handler, log *slog.Logger) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	return serve(ctx, ln, h, log)
}

func serve(ctx context.Context, ln net.Listener, h http.Handler, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: readHeaderTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	log.Info("metrics listening", "addr", ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	if serr := <-errc; !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	return err
}

// fixedCounter is a counter with one label whose values are a fixed set,
// created up front so that every series exists from the start (an alert on
// rate() sees zero, not nothing) and found without hashing.
type fixedCounter struct {
	vec      *prometheus.CounterVec
	children map[string]prometheus.Counter // read-only after construction
}

func newFixedCounter(reg prometheus.Registerer, opts prometheus.CounterOpts, label string, values []string) fixedCounter {
	vec := prometheus.NewCounterVec(opts, []string{label})
	reg.MustRegister(vec)
	f := fixedCounter{vec: vec, children: make(map[string]prometheus.Counter, len(values))}
	for _, v := range values {
		f.children[v] = vec.WithLabelValues(v)
	}
	return f
}

func (f fixedCounter) inc(value string) {
	c, ok := f.children[value]
	if !ok {
		c = f.vec.WithLabelValues(otherLabel)
	}
	c.Inc()
}

// statsCollector computes the gauges of cached policies at each scrape.
type statsCollector struct {
	stats    func() policycache.Stats
	entries  *prometheus.Desc
	policies *prometheus.Desc
	negative *prometheus.Desc
	failing  *prometheus.Desc
}

func newStatsCollector(stats func() policycache.Stats) *statsCollector {
	return &statsCollector{
		stats: stats,
		entries: prometheus.NewDesc(namespace+"_cache_entries",
			"Entries in the policy cache, negative and expired ones included.", nil, nil),
		policies: prometheus.NewDesc(namespace+"_policies",
			"Unexpired MTA-STS policies cached, by mode.", []string{"mode"}, nil),
		negative: prometheus.NewDesc(namespace+"_negative_entries",
			"Unexpired cache entries of domains without a usable policy (no record, failed discovery).", nil, nil),
		failing: prometheus.NewDesc(namespace+"_policies_refresh_failing_over_a_day",
			"Cached policies (mode enforce or testing) whose refresh has failed for more than a day: RFC 8461 §10.2 asks to alert on them.", nil, nil),
	}
}

func (c *statsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.entries
	ch <- c.policies
	ch <- c.negative
	ch <- c.failing
}

func (c *statsCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	ch <- prometheus.MustNewConstMetric(c.entries, prometheus.GaugeValue, float64(s.Entries))
	for _, mode := range modes {
		ch <- prometheus.MustNewConstMetric(c.policies, prometheus.GaugeValue, float64(s.ByMode[mode]), mode)
	}
	ch <- prometheus.MustNewConstMetric(c.negative, prometheus.GaugeValue, float64(s.Negative))
	ch <- prometheus.MustNewConstMetric(c.failing, prometheus.GaugeValue, float64(s.RefreshFailingOverADay))
}
