// Package admin serves stsmap's admin commands (`stsmap cache ...`) to the
// running daemon: list, show, purge and re-check cached MTA-STS policies.
//
// It speaks HTTP with JSON bodies over a unix socket, so that only who may
// open the socket file (by default the daemon's user and root) can use it,
// and nothing from another host can reach it:
//
//	GET    /cache                    every cached entry
//	GET    /cache/{domain}           one entry; 404 when not cached
//	DELETE /cache/{domain}           purge one domain
//	DELETE /cache?all=1              purge every domain
//	POST   /cache/{domain}/refresh   re-check one domain now
//
// A domain is normalised as Postfix's lookup keys are (policymap.NormalizeKey),
// so "Example.COM." names example.com; one that can have no policy gets 400.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"stsmap/policycache"
	"stsmap/policymap"
)

// Cache is what the admin server needs from the policy cache.
type Cache interface {
	// List returns every cached entry, sorted by domain.
	List() []*policycache.Entry
	// Peek returns domain's cached entry, expired or not.
	Peek(domain string) (*policycache.Entry, bool)
	// Purge removes domain from memory and the store; it reports whether
	// domain was cached.
	Purge(ctx context.Context, domain string) (bool, error)
	// PurgeAll removes every domain and returns how many.
	PurgeAll(ctx context.Context) (int, error)
	// RefreshNow re-checks domain now and returns its entry afterwards.
	RefreshNow(ctx context.Context, domain string) (*policycache.Entry, error)
}

var _ Cache = (*policycache.Cache)(nil)

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("admin: server closed")

// A Server answers admin requests about a Cache.
type Server struct {
	cache Cache
	log   *slog.Logger
	http  *http.Server
}

// NewServer returns a server for c that logs every change it makes to log
// (nil: slog.Default()).
func NewServer(c Cache, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	s := &Server{cache: c, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /cache", s.list)
	mux.HandleFunc("DELETE /cache", s.purgeAll)
	mux.HandleFunc("GET /cache/{domain}", s.show)
	mux.HandleFunc("DELETE /cache/{domain}", s.purge)
	mux.HandleFunc("POST /cache/{domain}/refresh", s.refresh)
	s.http = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		// No write timeout: a refresh takes up to fetch.timeout, and
		// purging a large store longer.
		IdleTimeout:    time.Minute,
		MaxHeaderBytes: 16 << 10,
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	return s
}

// Serve answers requests on l until Shutdown, then returns ErrServerClosed.
// It closes l on return.
func (s *Server) Serve(l net.Listener) error {
	err := s.http.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		return ErrServerClosed
	}
	return err
}

// Shutdown stops accepting and waits for the requests in flight until ctx
// ends; then it closes their connections and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.http.Shutdown(ctx)
	if err != nil {
		s.http.Close()
	}
	return err
}

func (s *Server) list(w http.ResponseWriter, r *http.Request) {
	entries := s.cache.List()
	body := listBody{Entries: make([]Entry, len(entries))}
	for i, e := range entries {
		body.Entries[i] = EntryOf(e)
	}
	writeJSON(w, http.StatusOK, body)
}

func (s *Server) show(w http.ResponseWriter, r *http.Request) {
	domain, ok := pathDomain(w, r)
	if !ok {
		return
	}
	e, ok := s.cache.Peek(domain)
	if !ok {
		writeJSON(w, http.StatusNotFound, errorBody{Error: domain + " is not cached"})
		return
	}
	writeJSON(w, http.StatusOK, EntryOf(e))
}

func (s *Server) purge(w http.ResponseWriter, r *http.Request) {
	domain, ok := pathDomain(w, r)
	if !ok {
		return
	}
	cached, err := s.cache.Purge(r.Context(), domain)
	if err != nil {
		s.log.Warn("admin: purge did not finish", "domain", domain, "was_cached", cached, "err", err)
		writeError(w, err, "purging "+domain+": removed from memory but not from the store, which may bring it back")
		return
	}
	s.log.Info("admin: cached policy purged", "domain", domain, "was_cached", cached)
	body := PurgeResult{Domain: domain}
	if cached {
		body.Purged = 1
	}
	writeJSON(w, http.StatusOK, body)
}

func (s *Server) purgeAll(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Get("all") != "1" {
		writeJSON(w, http.StatusBadRequest, errorBody{Error: "DELETE /cache purges every cached policy: add ?all=1 to confirm"})
		return
	}
	n, err := s.cache.PurgeAll(r.Context())
	if err != nil {
		s.log.Warn("admin: purge of all cached policies did not finish", "purged", n, "err", err)
		writeError(w, err, fmt.Sprintf("purging all: %d domains removed, but not all from the store", n))
		return
	}
	s.log.Info("admin: all cached policies purged", "purged", n)
	writeJSON(w, http.StatusOK, PurgeResult{Purged: n})
}

func (s *Server) refresh(w http.ResponseWriter, r *http.Request) {
	domain, ok := pathDomain(w, r)
	if !ok {
		return
	}
	e, err := s.cache.RefreshNow(r.Context(), domain)
	if err != nil {
		writeError(w, err, "refreshing "+domain)
		return
	}
	s.log.Info("admin: domain re-checked", "domain", domain, "policy_id", e.ID, "reason", string(e.Reason))
	writeJSON(w, http.StatusOK, EntryOf(e))
}

// pathDomain returns the request's normalised domain, or answers 400.
func pathDomain(w http.ResponseWriter, r *http.Request) (string, bool) {
	key := r.PathValue("domain")
	domain, err := policymap.NormalizeKey(key)
	if err != nil {
		reason := policymap.SkipReason(err)
		writeJSON(w, http.StatusBadRequest, errorBody{
			Error:  fmt.Sprintf("%q names no domain that can have an MTA-STS policy (%s)", key, reason),
			Reason: reason,
		})
		return "", false
	}
	return domain, true
}

// writeError answers a cache operation that failed: 503 while the daemon
// shuts down, 500 otherwise, saying what failed.
func writeError(w http.ResponseWriter, err error, what string) {
	if errors.Is(err, policycache.ErrClosed) {
		writeJSON(w, http.StatusServiceUnavailable, errorBody{Error: "stsmap is shutting down"})
		return
	}
	writeJSON(w, http.StatusInternalServerError, errorBody{Error: what + ": " + err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v) // the client is gone if this fails
}
