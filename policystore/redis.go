package policystore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"stsmap/policycache"
)

// Bounds of a Redis store. A Redis fault must never block or defer mail,
// so every call is short and go-redis never retries on its own: a failed
// call trips the breaker instead (see Redis).
const (
	redisDialTimeout   = time.Second
	redisIOTimeout     = 500 * time.Millisecond // read and write, each
	redisPoolSize      = 8
	redisProbeInterval = 2 * time.Second
	// redisMaxPending bounds the changes kept while Redis is down.
	redisMaxPending = 10000
	// Load scans with this COUNT hint and reads values in MGETs this long.
	redisScanCount = 1000
	redisMGetBatch = 500
)

// errRedisDown is returned by every call while the breaker is open.
var errRedisDown = fmt.Errorf("%w: redis unreachable, probing", policycache.ErrStoreUnavailable)

// RedisOptions configures OpenRedis.
type RedisOptions struct {
	// URL is cache.redis_url: redis://[user:password@]host:port/db,
	// rediss:// for TLS, or unix:///path. Its query may set go-redis
	// options (dial_timeout, read_timeout, write_timeout, pool_size,
	// max_retries, ...); those left out take the short defaults above.
	URL string
	// Prefix starts every key, so that several fleets (or other
	// applications) can share a server.
	Prefix string
	// Logger receives the outage and corrupt-record lines; nil discards.
	Logger *slog.Logger
	// ProbeInterval is how often a down server is PINGed; 0 means 2s.
	ProbeInterval time.Duration
}

// Redis is a policycache.Store on a Redis server shared by a fleet of MTAs,
// so that a policy one MTA learned is known to all of them and each domain
// is refreshed by one MTA per period (SPEC 6.5).
//
// Keys: <prefix>policy:<domain> holds Encode(entry) and expires with the
// policy; <prefix>refresh:<domain> is a refresh claim holding the owner
// ("hostname:pid") and expiring after the claimed period.
//
// Our users' design: when Redis is unreachable, stsmap keeps answering from
// memory and live discovery, logs it once, and resumes sharing when Redis
// returns; a Redis fault never blocks or defers mail. So the first call
// that fails to reach Redis (a connection error or a timeout, not an error
// reply such as WRONGTYPE) opens a breaker: until a background PING
// succeeds, every call returns at once with an error wrapping
// policycache.ErrStoreUnavailable. Changes Put or Deleted meanwhile are kept
// (the latest per domain, at most redisMaxPending domains) and written when
// Redis is back, before the breaker closes.
type Redis struct {
	client    *redis.Client
	prefix    string
	owner     string
	log       *slog.Logger
	opTimeout time.Duration
	interval  time.Duration
	now       func() time.Time

	available atomic.Bool // breaker closed; read without the lock on every call

	mu sync.Mutex
	// down mirrors !available and is what pending is kept consistent
	// with: pending is non-empty only while down, so the probe flushes
	// every kept change.
	down    bool
	pending map[string]*policycache.Entry // nil entry: a Delete
	dropped int                           // changes lost because pending was full

	wake      chan struct{} // tells the probe that the breaker opened
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

var _ policycache.Store = (*Redis)(nil)

// OpenRedis returns a store for the server at opts.URL. It does no I/O: a
// server that is down at start-up is no error, the first call finds out,
// opens the breaker and the probe reconnects later.
func OpenRedis(opts RedisOptions) (*Redis, error) {
	if opts.Logger != nil {
		// go-redis logs dial failures through the standard log package;
		// the breaker already reports outages once, so these go to debug.
		redis.SetLogger(debugLogger{opts.Logger})
	}
	o, err := redis.ParseURL(opts.URL)
	if err != nil {
		// url.Error repeats the URL, password included.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("policystore: cache.redis_url: %v", err)
	}
	if o.DialTimeout == 0 {
		o.DialTimeout = redisDialTimeout
	}
	if o.ReadTimeout == 0 {
		o.ReadTimeout = redisIOTimeout
	}
	if o.WriteTimeout == 0 {
		o.WriteTimeout = redisIOTimeout
	}
	if o.MaxRetries == 0 {
		o.MaxRetries = -1 // go-redis: -1 is no retry, 0 is three
	}
	if o.PoolSize == 0 {
		o.PoolSize = redisPoolSize
	}
	if o.PoolTimeout == 0 {
		o.PoolTimeout = redisIOTimeout
	}
	if o.PipelinePoolSize == 0 {
		o.PipelinePoolSize = -1 // no pipelines here; no second pool
	}
	o.DialerRetries = 1 // one dial per call: the breaker, not go-redis, retries
	o.ContextTimeoutEnabled = true
	o.DisableIdentity = true // no CLIENT SETINFO round trips on connect
	o.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}

	interval := opts.ProbeInterval
	if interval <= 0 {
		interval = redisProbeInterval
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	host, err := os.Hostname()
	if err != nil {
		host = "unknown"
	}
	// A call's whole budget, a new connection's handshake included: a
	// dial, a write and a read. A URL asking for no timeout (-1) still
	// gets a bounded call.
	opTimeout := max(o.DialTimeout, 0) + max(o.WriteTimeout, 0) + max(o.ReadTimeout, 0)
	if opTimeout <= 0 {
		opTimeout = redisDialTimeout + 2*redisIOTimeout
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Redis{
		client:    redis.NewClient(o),
		prefix:    opts.Prefix,
		owner:     host + ":" + strconv.Itoa(os.Getpid()),
		log:       logger,
		opTimeout: opTimeout,
		interval:  interval,
		now:       time.Now,
		pending:   map[string]*policycache.Entry{},
		wake:      make(chan struct{}, 1),
		ctx:       ctx,
		cancel:    cancel,
	}
	r.available.Store(true)
	r.wg.Add(1)
	go r.probe()
	return r, nil
}

// Available reports whether the breaker is closed (Redis reachable at the
// last call), for logs and metrics.
func (r *Redis) Available() bool { return r.available.Load() }

// Load calls fn for every unexpired stored entry, deleting the expired and
// undecodable records it finds. When Redis is unreachable it returns an
// error wrapping policycache.ErrStoreUnavailable within one call's timeout;
// the caller starts with an empty cache and the probe reconnects.
func (r *Redis) Load(ctx context.Context, now time.Time, fn func(*policycache.Entry)) error {
	if !r.available.Load() {
		return errRedisDown
	}
	match := escapeGlob(r.prefix+"policy:") + "*"
	seen := map[string]struct{}{} // SCAN may return a key twice
	var batch []string
	readBatch := func() error {
		defer func() { batch = batch[:0] }()
		if len(batch) == 0 {
			return nil
		}
		cctx, cancel := context.WithTimeout(ctx, r.opTimeout)
		vals, err := r.client.MGet(cctx, batch...).Result()
		cancel()
		if err != nil {
			return r.failed(ctx, err)
		}
		var stale []string
		for i, v := range vals {
			s, ok := v.(string)
			if !ok {
				continue // expired since the SCAN
			}
			e, drop := r.decode(batch[i], []byte(s))
			switch {
			case drop:
				stale = append(stale, batch[i])
			case e == nil: // a newer format, left alone
			case !e.Expires.After(now):
				stale = append(stale, batch[i]) // a record written without a TTL
			default:
				fn(e)
			}
		}
		if len(stale) > 0 {
			cctx, cancel := context.WithTimeout(ctx, r.opTimeout)
			err := r.client.Del(cctx, stale...).Err()
			cancel()
			if err != nil {
				return r.failed(ctx, err)
			}
		}
		return nil
	}
	var cursor uint64
	for {
		cctx, cancel := context.WithTimeout(ctx, r.opTimeout)
		keys, next, err := r.client.Scan(cctx, cursor, match, redisScanCount).Result()
		cancel()
		if err != nil {
			return r.failed(ctx, err)
		}
		for _, k := range keys {
			if _, dup := seen[k]; dup {
				continue
			}
			seen[k] = struct{}{}
			batch = append(batch, k)
			if len(batch) == redisMGetBatch {
				if err := readBatch(); err != nil {
					return err
				}
			}
		}
		if cursor = next; cursor == 0 {
			return readBatch()
		}
	}
}

// Get returns the domain's stored entry, or nil and no error when there is
// none (an expired or undecodable record counts as none).
func (r *Redis) Get(ctx context.Context, domain string) (*policycache.Entry, error) {
	if !r.available.Load() {
		return nil, errRedisDown
	}
	key := r.policyKey(domain)
	cctx, cancel := context.WithTimeout(ctx, r.opTimeout)
	b, err := r.client.Get(cctx, key).Bytes()
	cancel()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, r.failed(ctx, err)
	}
	e, drop := r.decode(key, b)
	if drop {
		cctx, cancel := context.WithTimeout(ctx, r.opTimeout)
		_ = r.failed(ctx, r.client.Del(cctx, key).Err()) // absent either way
		cancel()
	}
	if e == nil {
		return nil, nil
	}
	if !e.Expires.After(r.now()) {
		return nil, nil // SPEC 6.2: never served; the key's TTL removes it
	}
	return e, nil
}

// Put stores e with a TTL that ends at e.Expires. While Redis is down it
// keeps e to write when Redis returns, and returns an error wrapping
// policycache.ErrStoreUnavailable.
func (r *Redis) Put(ctx context.Context, e *policycache.Entry) error {
	b, err := Encode(e)
	if err != nil {
		return err
	}
	if r.keepIfDown(e.Domain, e) {
		return errRedisDown
	}
	return r.failedChange(ctx, r.write(ctx, e.Domain, e, b), e.Domain, e)
}

// Delete removes the domain's entry. While Redis is down the deletion is
// kept like a Put, so that a policy dropped during an outage does not come
// back from Redis.
func (r *Redis) Delete(ctx context.Context, domain string) error {
	if r.keepIfDown(domain, nil) {
		return errRedisDown
	}
	return r.failedChange(ctx, r.write(ctx, domain, nil, nil), domain, nil)
}

// Claim reports whether this process should refresh domain now: true when
// it set the domain's claim (SET NX PX period), false when another MTA
// holds it (SPEC 6.5: one refresh per domain per period per fleet).
//
// On any error, Redis down included, Claim returns true with the error: a
// domain refreshed by two MTAs costs one more query, a domain refreshed by
// none could let its policy lapse.
func (r *Redis) Claim(ctx context.Context, domain string, period time.Duration) (bool, error) {
	if !r.available.Load() {
		return true, errRedisDown
	}
	if period < time.Millisecond {
		return true, fmt.Errorf("policystore: redis: claim period %v too short", period)
	}
	cctx, cancel := context.WithTimeout(ctx, r.opTimeout)
	ok, err := r.client.SetNX(cctx, r.prefix+"refresh:"+domain, r.owner, period).Result()
	cancel()
	if err != nil {
		return true, r.failed(ctx, err)
	}
	return ok, nil
}

// Close stops the probe and closes the connections. Changes kept during an
// outage that has not ended are lost; the other MTAs rediscover them.
func (r *Redis) Close() error {
	r.closeOnce.Do(func() {
		r.cancel()
		r.wg.Wait()
		r.available.Store(false)
		r.closeErr = r.client.Close()
	})
	return r.closeErr
}

func (r *Redis) policyKey(domain string) string { return r.prefix + "policy:" + domain }

// write stores e (encoded as b) under domain, or deletes the domain's
// record when e is nil or already expired.
func (r *Redis) write(ctx context.Context, domain string, e *policycache.Entry, b []byte) error {
	cctx, cancel := context.WithTimeout(ctx, r.opTimeout)
	defer cancel()
	key := r.policyKey(domain)
	if e == nil {
		return r.client.Del(cctx, key).Err()
	}
	ttl := e.Expires.Sub(r.now())
	if ttl < time.Millisecond {
		return r.client.Del(cctx, key).Err()
	}
	// A TTL relative to our clock rather than PEXPIREAT: SET ... PX is one
	// atomic command on every Redis version, and the key lives exactly as
	// long as the policy even when the server's clock is off.
	return r.client.Set(cctx, key, b, ttl.Round(time.Millisecond)).Err()
}

// decode reads the record stored under key. A record that does not decode,
// or that names another domain (it must never answer for this one), is
// logged and reported with drop set, for the caller to delete. A record of
// a newer format is left alone: an MTA of the next release wrote it during
// a rolling upgrade.
func (r *Redis) decode(key string, b []byte) (e *policycache.Entry, drop bool) {
	domain := strings.TrimPrefix(key, r.prefix+"policy:")
	e, err := Decode(b)
	if err == nil && e.Domain != domain {
		err = fmt.Errorf("%w: record of %s", ErrCorrupt, clip(e.Domain))
	}
	if err == nil {
		return e, false
	}
	var head struct {
		V int `json:"v"`
	}
	if json.Unmarshal(b, &head) == nil && head.V > recordVersion {
		r.log.Debug("redis: skipping policy record of a newer format", "domain", bound(domain), "v", head.V)
		return nil, false
	}
	r.log.Warn("redis: dropping undecodable policy record",
		"domain", bound(domain), "err", bound(err.Error()))
	return nil, true
}

// unreachable reports whether err means Redis could not be reached or did
// not answer in time, as opposed to an error reply (WRONGTYPE, NOAUTH,
// LOADING: Redis answered) or the caller giving up on ctx.
func (r *Redis) unreachable(ctx context.Context, err error) bool {
	var reply redis.Error
	switch {
	case err == nil, errors.As(err, &reply), errors.Is(err, redis.ErrClosed):
		return false
	case ctx.Err() != nil:
		return false
	}
	return true
}

// failed classifies the error of a call made with ctx: one that means Redis
// is unreachable opens the breaker and is returned wrapping
// policycache.ErrStoreUnavailable.
func (r *Redis) failed(ctx context.Context, err error) error {
	return r.failedChange(ctx, err, "", nil)
}

// failedChange is failed for a Put (e) or Delete (nil e) of domain, which
// is kept for the probe to write when Redis is unreachable. Opening the
// breaker and keeping the change happen under one lock, so the probe
// cannot close the breaker in between and leave the change unwritten.
func (r *Redis) failedChange(ctx context.Context, err error, domain string, e *policycache.Entry) error {
	if err == nil {
		return nil
	}
	if !r.unreachable(ctx, err) {
		return fmt.Errorf("policystore: redis: %w", err)
	}
	r.mu.Lock()
	opened := !r.down
	r.down = true
	r.available.Store(false)
	if domain != "" {
		r.keepLocked(domain, e)
	}
	r.mu.Unlock()
	if opened {
		r.log.Warn("redis unreachable; answering from memory and live discovery",
			"err", bound(err.Error()))
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
	return fmt.Errorf("%w: %w", policycache.ErrStoreUnavailable, err)
}

// keepIfDown keeps a change (nil e: a Delete) for the probe to write, and
// reports true, when the breaker is open.
func (r *Redis) keepIfDown(domain string, e *policycache.Entry) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.down {
		return false
	}
	r.keepLocked(domain, e)
	return true
}

func (r *Redis) keepLocked(domain string, e *policycache.Entry) {
	if _, ok := r.pending[domain]; !ok && len(r.pending) >= redisMaxPending {
		r.dropped++
		return
	}
	r.pending[domain] = e
}

// probe PINGs Redis every interval while the breaker is open; when Redis
// answers, it writes the kept changes and closes the breaker.
func (r *Redis) probe() {
	defer r.wg.Done()
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-r.wake:
		}
		t := time.NewTicker(r.interval)
		for resumed := false; !resumed; resumed = r.resume() {
			select {
			case <-r.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		t.Stop()
	}
}

// resume reports whether the breaker is closed, closing it when Redis
// answers and every kept change is written. The breaker closes only with
// nothing left to write, so a change made during the flush (kept, as the
// breaker is still open) is written after, never overwritten by an older
// one.
func (r *Redis) resume() bool {
	r.mu.Lock()
	down := r.down
	r.mu.Unlock()
	if !down {
		return true
	}
	ctx, cancel := context.WithTimeout(r.ctx, r.opTimeout)
	err := r.client.Ping(ctx).Err()
	cancel()
	if err != nil {
		return false
	}
	written := 0
	for {
		r.mu.Lock()
		if len(r.pending) == 0 {
			r.down = false
			r.available.Store(true)
			dropped := r.dropped
			r.dropped = 0
			r.mu.Unlock()
			r.log.Info("redis reachable again; sharing resumed", "written", written, "dropped", dropped)
			return true
		}
		batch := r.pending
		r.pending = map[string]*policycache.Entry{}
		r.mu.Unlock()
		n, ok := r.flush(batch)
		written += n
		if !ok {
			return false
		}
	}
}

// flush writes the kept changes in batch; when Redis fails again it keeps
// the unwritten ones (unless a newer change came meanwhile) and reports
// false. Expired entries are skipped: whatever Redis holds is no older.
func (r *Redis) flush(batch map[string]*policycache.Entry) (written int, ok bool) {
	now := r.now()
	for domain, e := range batch {
		if r.ctx.Err() != nil {
			return written, false
		}
		var b []byte
		if e != nil {
			if !e.Expires.After(now) {
				delete(batch, domain)
				continue
			}
			var err error
			if b, err = Encode(e); err != nil {
				delete(batch, domain)
				continue
			}
		}
		err := r.write(r.ctx, domain, e, b)
		if err != nil && r.unreachable(r.ctx, err) {
			r.mu.Lock()
			for d, e := range batch {
				if _, newer := r.pending[d]; !newer {
					r.keepLocked(d, e)
				}
			}
			r.mu.Unlock()
			return written, false
		}
		if err != nil {
			r.log.Debug("redis: kept change not written", "domain", domain, "err", bound(err.Error()))
		} else {
			written++
		}
		delete(batch, domain)
	}
	return written, true
}

// escapeGlob quotes the glob metacharacters of a SCAN MATCH pattern, so
// that any prefix matches literally.
func escapeGlob(s string) string {
	var b strings.Builder
	for i := range len(s) {
		if strings.IndexByte(`*?[]\`, s[i]) >= 0 {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// debugLogger routes go-redis's own messages to slog at debug level.
type debugLogger struct{ log *slog.Logger }

func (d debugLogger) Printf(ctx context.Context, format string, v ...any) {
	if d.log.Enabled(ctx, slog.LevelDebug) {
		d.log.Debug("redis client: " + clip(fmt.Sprintf(format, v...)))
	}
}
