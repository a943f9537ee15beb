// Command stsmap makes Postfix enforce MTA-STS (RFC 8461): it answers
// Postfix's smtp_tls_policy_maps over the socketmap protocol from each
// next-hop domain's MTA-STS policy.
//
//	stsmap [serve] [-config FILE]          run the daemon
//	stsmap query [-config FILE] [-json] KEY one lookup, no daemon
//	stsmap check-config -config FILE       validate a config file
//	stsmap version
package main

import (
	"context"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"stsmap/admin"
	"stsmap/config"
	"stsmap/dane"
	"stsmap/metrics"
	"stsmap/policycache"
	"stsmap/policymap"
	"stsmap/policystore"
	"stsmap/resolver"
	"stsmap/socketmap"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Exit statuses.
const (
	exitOK       = 0
	exitNotFound = 1 // query: NOTFOUND; check-config: invalid; serve: runtime failure
	exitUsage    = 2 // usage or config error
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], &env{stdout: os.Stdout, stderr: os.Stderr}))
}

// env is what a command reads and writes besides its arguments; tests
// replace parts of it.
type env struct {
	stdout, stderr io.Writer
	// resolvConf is the resolv.conf read when dns.nameservers is empty;
	// "" means /etc/resolv.conf.
	resolvConf string
	// rootCAs and dial, when set, replace the system roots and the dialer
	// of the policy fetcher (tests reach httptest servers through them).
	rootCAs *x509.CertPool
	dial    func(ctx context.Context, network, addr string) (net.Conn, error)
	// ready, when set, receives the listeners' addresses once serving.
	ready func(addrs []net.Addr)
}

const usage = `usage:
  stsmap [serve] [-config FILE]            run the daemon (embedded defaults without -config)
  stsmap query [-config FILE] [-map NAME] [-json] KEY
                                           look KEY up once, as Postfix would; exit 0 found, 1 not found
  stsmap cache [-config FILE] [-socket PATH] list [-json] | show DOMAIN | purge DOMAIN | purge -all | refresh DOMAIN
                                           the running daemon's cached policies
  stsmap check-config -config FILE         validate a config file
  stsmap version
`

func run(ctx context.Context, args []string, e *env) int {
	cmd := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "serve":
		return runServe(ctx, args, e)
	case "query":
		return runQuery(ctx, args, e)
	case "cache":
		return runCache(ctx, args, e)
	case "check-config":
		return runCheckConfig(args, e)
	case "version":
		fmt.Fprintf(e.stdout, "stsmap %s (%s)\n", version, runtime.Version())
		return exitOK
	case "help":
		fmt.Fprint(e.stdout, usage)
		return exitOK
	default:
		fmt.Fprintf(e.stderr, "stsmap: unknown command %q\n%s", cmd, usage)
		return exitUsage
	}
}

// loadConfig returns the embedded defaults when path is empty.
func loadConfig(path string) (*config.Config, error) {
	if path == "" {
		return config.Default(), nil
	}
	return config.Load(path)
}

func newFlagSet(name string, e *env) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	fs.Usage = func() { fmt.Fprint(e.stderr, usage) }
	return fs
}

func runCheckConfig(args []string, e *env) int {
	fs := newFlagSet("check-config", e)
	path := fs.String("config", "", "config file to validate")
	if err := fs.Parse(args); err != nil || *path == "" || fs.NArg() != 0 {
		fmt.Fprint(e.stderr, usage)
		return exitUsage
	}
	if _, err := config.Load(*path); err != nil {
		fmt.Fprintf(e.stderr, "stsmap: %v\n", err)
		return exitNotFound
	}
	fmt.Fprintf(e.stdout, "%s: OK\n", *path)
	return exitOK
}

// newLogger builds the logger; level, when given, holds its level so that a
// reload can change it.
func newLogger(cfg *config.Config, w io.Writer, level ...*slog.LevelVar) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.Log.Level}
	if len(level) > 0 {
		level[0].Set(cfg.Log.Level)
		opts.Level = level[0]
	}
	if cfg.Log.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// newResolver builds the DNS client and policy fetcher from cfg.
func newResolver(cfg *config.Config, e *env) (*resolver.Resolver, error) {
	servers := cfg.DNS.Nameservers
	if len(servers) == 0 {
		path := e.resolvConf
		if path == "" {
			path = "/etc/resolv.conf"
		}
		var err error
		if servers, err = resolver.ServersFromResolvConf(path); err != nil {
			return nil, fmt.Errorf("dns.nameservers is empty and %w; set dns.nameservers in the config", err)
		}
	}
	dns := resolver.NewDNS(servers, cfg.DNS.Timeout)
	return &resolver.Resolver{
		DNS:     dns,
		Fetcher: &resolver.Fetcher{Hosts: dns, RootCAs: e.rootCAs, DialContext: e.dial},
	}, nil
}

// newCache builds the policy cache; the daemon's also refreshes in the
// background, stsmap query's only discovers.
func newCache(cfg *config.Config, src policycache.Source, store policycache.Store, refresh bool, obs *metrics.Metrics, log *slog.Logger) *policycache.Cache {
	c := policycache.Config{
		Size:                cfg.Cache.Size,
		NegativeTTL:         cfg.Cache.NegativeTTL,
		FirstContactTimeout: cfg.Fetch.FirstContactTimeout,
		FetchTimeout:        cfg.Fetch.Timeout,
		Store:               store,
		Logger:              log,
	}
	if obs != nil { // a nil *Metrics in the interface would not be nil
		c.Observer = obs
	}
	if refresh {
		c.Refresh = policycache.RefreshConfig{
			Interval:    cfg.Refresh.Interval,
			RenewBefore: cfg.Refresh.RenewBefore,
			Concurrency: cfg.Refresh.Concurrency,
			IdleAfter:   cfg.Refresh.IdleAfter,
		}
	}
	return policycache.New(src, c)
}

// newDANE builds the DANE checker on the configured resolver (SPEC 7.5).
func newDANE(res *resolver.Resolver, log *slog.Logger) *dane.Checker {
	return dane.New(res.DNS, dane.Config{Logger: log})
}

// openStore opens the policy store cache.store names; nil for memory.
func openStore(cfg *config.Config, log *slog.Logger) (policycache.Store, error) {
	switch cfg.Cache.Store {
	case "bolt":
		path, err := cfg.StorePath()
		if err != nil {
			return nil, fmt.Errorf("cache.path: %w", err)
		}
		b, err := policystore.OpenBolt(path, log)
		if err != nil {
			return nil, err
		}
		if moved := b.MovedAside(); moved != "" {
			log.Error("the policy store was damaged: moved aside, starting with an empty cache; policies are learned again as Postfix asks",
				"path", path, "moved_to", moved)
		}
		return b, nil
	case "redis":
		return policystore.OpenRedis(policystore.RedisOptions{URL: cfg.Cache.RedisURL, Prefix: cfg.Cache.RedisPrefix, Logger: log})
	default:
		return nil, nil
	}
}

func runServe(ctx context.Context, args []string, e *env) int {
	fs := newFlagSet("serve", e)
	path := fs.String("config", "", "config file (default: embedded defaults)")
	if err := fs.Parse(args); err != nil || fs.NArg() != 0 {
		return exitUsage
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		fmt.Fprintf(e.stderr, "stsmap: %v\n", err)
		return exitUsage
	}
	return serve(ctx, cfg, *path, e)
}

// serve runs the daemon until ctx ends or a signal arrives. path is the
// config file cfg came from ("" for the embedded defaults), re-read on
// SIGHUP.
func serve(ctx context.Context, cfg *config.Config, path string, e *env) int {
	var level slog.LevelVar
	log := newLogger(cfg, e.stderr, &level)
	var current atomic.Pointer[config.Config] // replaced by a reload
	current.Store(cfg)
	res, err := newResolver(cfg, e)
	if err != nil {
		log.Error("cannot start", "err", err)
		return exitUsage
	}
	store, err := openStore(cfg, log)
	if err != nil {
		log.Error("cannot open the policy store; fix it, or set cache.store: memory to run without one", "store", cfg.Cache.Store, "err", err)
		return exitNotFound
	}
	if store != nil {
		defer store.Close()
	}
	var cache *policycache.Cache
	var m *metrics.Metrics
	if cfg.Metrics.Listen != "" {
		m = metrics.New(func() policycache.Stats { return cache.Stats() }) // called at scrape time only
	}
	cache = newCache(cfg, res, store, true, m, log)
	defer cache.Close() // before store.Close: refreshes write to the store
	if store != nil {
		// The store loads in the background, so that Postfix is answered
		// at once however many policies are stored: until the load ends,
		// a lookup that misses the cache reads its domain from the store
		// before any discovery (policycache.Cache.Lookup).
		loadCtx, cancelLoad := context.WithCancel(ctx)
		loaded := make(chan struct{})
		defer func() { cancelLoad(); <-loaded }() // before cache.Close and store.Close
		go func() {
			defer close(loaded)
			start := time.Now()
			n, err := cache.LoadStore(loadCtx)
			if err != nil && loadCtx.Err() == nil {
				log.Warn("could not load the policy store; starting with what it gave", "store", cfg.Cache.Store, "err", err)
			}
			log.Info("policy store loaded", "store", cfg.Cache.Store, "policies", n, "seconds", time.Since(start).Seconds())
		}()
	}

	handler := &policymap.Handler{
		Cache:       cache,
		Settings:    func(name string) policymap.Settings { return policymap.Settings(current.Load().MapSettings(name)) },
		DANETimeout: cfg.Fetch.FirstContactTimeout,
		Logger:      log,
		HotSize:     cfg.Cache.Size, // a reply kept ready per cached domain
	}
	if cfg.DANE == "auto" {
		checker := newDANE(res, log)
		defer checker.Close()
		handler.DANE = checker
	}
	srv := &socketmap.Server{
		Handler:        handler,
		Logger:         log,
		MaxRequestSize: cfg.Socketmap.MaxRequestSize,
		IdleTimeout:    cfg.Socketmap.IdleTimeout,
		MaxConns:       cfg.Socketmap.MaxConnections,
	}
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	for _, addr := range cfg.Listen {
		l, err := socketmap.Listen(addr, cfg.Socketmap.UnixSocketMode)
		if err != nil {
			log.Error("cannot listen; is another stsmap running, or is the address wrong?", "listen", addr, "err", err)
			return exitNotFound
		}
		listeners = append(listeners, l)
		if err := socketmap.Chown(addr, cfg.Socketmap.UnixSocketOwner, cfg.Socketmap.UnixSocketGroup); err != nil {
			log.Error("cannot set the unix socket's owner; check socketmap.unix_socket_owner and unix_socket_group", "listen", addr, "err", err)
			return exitNotFound
		}
	}

	// The admin socket of stsmap cache. Mail does not depend on it: without
	// it the daemon runs on, and says why.
	var adminSrv *admin.Server
	if cfg.Admin.Socket != "none" {
		if path, err := adminSocketPath(cfg); err != nil {
			log.Error("no admin socket: stsmap cache commands will not work; set admin.socket", "err", err)
		} else if l, err := admin.Listen(path, admin.DefaultSocketMode); err != nil {
			log.Error("no admin socket: stsmap cache commands will not work", "socket", path, "err", err)
		} else {
			adminSrv = admin.NewServer(cache, log)
			go func() {
				if err := adminSrv.Serve(l); !errors.Is(err, admin.ErrServerClosed) {
					log.Error("admin socket failed: stsmap cache commands will not work", "socket", path, "err", err)
				}
			}()
		}
	}
	if m != nil {
		handler.Observe = m.ObserveLookup
		srv.ConnState = m.ConnState
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var ready atomic.Bool // for /healthz: listeners up (the store may still be loading)
	metricsErr := make(chan error, 1)
	if m != nil {
		go func() { metricsErr <- metrics.Serve(ctx, cfg.Metrics.Listen, m.Handler(ready.Load), log) }()
	}
	errc := make(chan error, len(listeners))
	addrs := make([]net.Addr, len(listeners))
	for i, l := range listeners {
		addrs[i] = l.Addr()
		go func() { errc <- srv.Serve(l) }()
	}
	log.Info("stsmap serving", "version", version, "listen", cfg.Listen, "config", configName(path))
	if e.ready != nil {
		e.ready(addrs)
	}
	ready.Store(true)
	if err := notify("READY=1"); err != nil {
		log.Warn("cannot notify systemd of readiness", "err", err)
	}

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	status := exitOK
	for running := true; running; {
		select {
		case <-hup:
			reload(path, &current, &level, cache, log)
		case <-ctx.Done():
			log.Info("shutting down")
			notify("STOPPING=1")
			running = false
		case err := <-metricsErr:
			if err != nil {
				log.Error("metrics listener failed; fix or empty metrics.listen", "listen", cfg.Metrics.Listen, "err", err)
				status = exitNotFound
			}
			running = false
		case err := <-errc:
			log.Error("listener failed", "err", err)
			status = exitNotFound
			running = false
		}
	}
	// SPEC 8.1: stop accepting, finish in-flight replies. A lookup waits at
	// most the first-contact timeout, so that bounds the wait.
	sctx, cancel := context.WithTimeout(context.Background(), cfg.Fetch.FirstContactTimeout+5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, socketmap.ErrServerClosed) {
		log.Warn("shutdown did not finish in time; connections were closed", "err", err)
	}
	if adminSrv != nil {
		if err := adminSrv.Shutdown(sctx); err != nil {
			log.Warn("admin requests did not finish in time; their connections were closed", "err", err)
		}
	}
	return status
}

// reload re-reads the config file on SIGHUP and puts what can change in
// force: map settings, log level, timeouts, negative TTL and refresh
// settings. Connections and the cache are kept. A config that does not load
// is refused and the running one stays; settings that need a restart are
// named in a warning.
func reload(path string, current *atomic.Pointer[config.Config], level *slog.LevelVar, cache *policycache.Cache, log *slog.Logger) {
	if path == "" {
		log.Warn("SIGHUP: running on the embedded defaults; there is no config file to reload")
		return
	}
	next, err := config.Load(path)
	if err != nil {
		log.Error("config reload refused; the running config stays in force", "config", path, "err", err)
		return
	}
	old := current.Load()
	var restart []string
	for key, same := range map[string]bool{
		"listen":    slices.Equal(old.Listen, next.Listen),
		"socketmap": old.Socketmap == next.Socketmap,
		"dns":       slices.Equal(old.DNS.Nameservers, next.DNS.Nameservers) && old.DNS.Timeout == next.DNS.Timeout,
		"cache.store, path, redis_url, redis_prefix, size": old.Cache.Store == next.Cache.Store && old.Cache.Path == next.Cache.Path &&
			old.Cache.RedisURL == next.Cache.RedisURL && old.Cache.RedisPrefix == next.Cache.RedisPrefix && old.Cache.Size == next.Cache.Size,
		"metrics":    old.Metrics == next.Metrics,
		"dane":       old.DANE == next.DANE,
		"log.format": old.Log.Format == next.Log.Format,
	} {
		if !same {
			restart = append(restart, key)
		}
	}
	cache.Retune(policycache.Tunables{
		NegativeTTL:         next.Cache.NegativeTTL,
		FirstContactTimeout: next.Fetch.FirstContactTimeout,
		FetchTimeout:        next.Fetch.Timeout,
		Refresh: policycache.RefreshConfig{Interval: next.Refresh.Interval, RenewBefore: next.Refresh.RenewBefore,
			Concurrency: next.Refresh.Concurrency, IdleAfter: next.Refresh.IdleAfter},
	})
	level.Set(next.Log.Level)
	current.Store(next)
	log.Info("config reloaded", "config", path)
	if len(restart) > 0 {
		slices.Sort(restart)
		log.Warn("config reloaded, but these settings change only with a restart", "settings", strings.Join(restart, "; "))
	}
}

func configName(path string) string {
	if path == "" {
		return "(embedded defaults)"
	}
	return path
}
