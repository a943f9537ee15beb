package socketmap

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Defaults for the zero fields of a Server.
const (
	DefaultMaxRequestSize = 10000  // SPEC 1.1: Postfix's query limit
	DefaultMaxReplySize   = 100000 // SPEC 1.4: Postfix's reply limit
	DefaultIdleTimeout    = 60 * time.Second
	DefaultWriteTimeout   = 10 * time.Second
	DefaultMaxConns       = 1000
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("socketmap: server closed")

// A Server answers socketmap requests with a Handler. Set its fields before
// the first call to Serve; zero fields take the defaults above.
type Server struct {
	Handler        Handler
	Logger         *slog.Logger  // nil: slog.Default()
	MaxRequestSize int           // largest request payload (SPEC 1.1)
	MaxReplySize   int           // an encoded reply must be shorter (SPEC 1.4)
	IdleTimeout    time.Duration // wait for the next request on a connection (up to an eighth longer)
	WriteTimeout   time.Duration // bound on writing replies (up to an eighth longer)
	MaxConns       int           // open connections at most, over all listeners
	// ConnState, when set, is called with +1 when a connection starts
	// being served and with -1 when it ends, for metrics. It must not
	// block.
	ConnState func(delta int)

	initOnce sync.Once
	ctx      context.Context // handlers' context, cancelled by Close
	cancel   context.CancelFunc
	slots    chan struct{} // one token per open connection (MaxConns)
	quit     chan struct{} // closed when Shutdown or Close starts
	closing  atomic.Bool

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	wg        sync.WaitGroup // Serve loops and connections; Add only under mu while !closing
}

func (s *Server) init() {
	s.initOnce.Do(func() {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.slots = make(chan struct{}, positive(s.MaxConns, DefaultMaxConns))
		s.quit = make(chan struct{})
		s.listeners = make(map[net.Listener]struct{})
		s.conns = make(map[*conn]struct{})
	})
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

// Serve accepts connections on l and serves each in its own goroutine until
// Shutdown or Close, then returns ErrServerClosed. It closes l on return.
// Several Serve calls, one per listener, may run at once (SPEC 1.5).
func (s *Server) Serve(l net.Listener) error {
	defer l.Close()
	if s.Handler == nil {
		return errors.New("socketmap: nil Handler")
	}
	s.init()
	if !s.trackListener(l) {
		return ErrServerClosed
	}
	defer s.untrackListener(l)

	var backoff time.Duration
	for {
		rwc, err := l.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			if !temporary(err) {
				return err
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.logger().Warn("socketmap: accept failed; retrying", "err", err, "retry_seconds", backoff.Seconds())
			select {
			case <-time.After(backoff):
			case <-s.quit:
				return ErrServerClosed
			}
			continue
		}
		backoff = 0
		// MaxConns: at the limit, hold this connection unanswered and accept
		// no other until a slot frees, so that established clients keep
		// being served. The slot is taken after Accept, not before, so that
		// a listener waiting for clients never holds one that another
		// listener could use.
		select {
		case s.slots <- struct{}{}:
		case <-s.quit:
			rwc.Close()
			return ErrServerClosed
		}
		c := s.newConn(rwc)
		if !s.trackConn(c) {
			rwc.Close()
			<-s.slots
			return ErrServerClosed
		}
		s.connState(+1)
		go c.serve()
	}
}

// temporary reports whether an Accept error is worth retrying, such as
// running out of file descriptors.
func temporary(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// Shutdown stops accepting, closes idle connections at once and lets busy
// ones finish their current request and write its reply, then returns nil
// (SPEC 8.1). Pipelined requests after the current one are not answered;
// Postfix retries a dropped connection once (SPEC 1.2). If ctx ends first,
// Shutdown closes everything as Close does and returns ctx.Err().
func (s *Server) Shutdown(ctx context.Context) error {
	s.init()
	s.mu.Lock()
	s.beginCloseLocked()
	for c := range s.conns {
		if c.state.CompareAndSwap(stateIdle, stateClosed) {
			c.rwc.Close()
		}
	}
	s.mu.Unlock()

	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		s.cancel()
		return nil
	case <-ctx.Done():
		s.Close()
		return ctx.Err()
	}
}

// Close closes the listeners and all connections at once and cancels the
// handlers' context. Replies in flight are lost.
func (s *Server) Close() error {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.beginCloseLocked()
	for c := range s.conns {
		c.state.Store(stateClosed)
		c.rwc.Close()
	}
	s.cancel()
	return err
}

// beginCloseLocked marks the server closing and closes its listeners,
// returning the first error from closing one.
func (s *Server) beginCloseLocked() error {
	if !s.closing.Swap(true) {
		close(s.quit)
	}
	var err error
	for l := range s.listeners {
		if cerr := l.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}
	clear(s.listeners)
	return err
}

func (s *Server) trackListener(l net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		return false
	}
	s.listeners[l] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) untrackListener(l net.Listener) {
	s.mu.Lock()
	delete(s.listeners, l)
	s.mu.Unlock()
	s.wg.Done()
}

func (s *Server) trackConn(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		return false
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) finishConn(c *conn) {
	c.rwc.Close()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	// Report the end while the slot is still held: a connection waiting
	// at the limit starts as soon as it is freed, and ConnState must never
	// count more than MaxConns.
	s.connState(-1)
	<-s.slots
	s.wg.Done()
}

func (s *Server) connState(delta int) {
	if s.ConnState != nil {
		s.ConnState(delta)
	}
}

// Connection states. Only the connection's goroutine moves between active
// and idle; Shutdown closes a connection only if it wins idle -> closed.
const (
	stateActive int32 = iota // reading or answering a request
	stateIdle                // waiting for the next request
	stateClosed              // closed by Shutdown or Close
)

// conn is one client connection. Its buffers are reused for every request,
// so that answering one costs a single allocation: the key string.
type conn struct {
	srv    *Server
	rwc    net.Conn
	remote string
	br     *bufio.Reader
	bw     *bufio.Writer
	dec    *Decoder
	out    []byte // the encoded reply
	name   string // the last map name, reused while it repeats
	state  atomic.Int32
	// The deadlines set on rwc (extendDeadline).
	readDeadline, writeDeadline time.Time
}

func (s *Server) newConn(rwc net.Conn) *conn {
	c := &conn{
		srv:    s,
		rwc:    rwc,
		remote: rwc.RemoteAddr().String(),
		br:     bufio.NewReader(rwc),
		bw:     bufio.NewWriter(rwc),
	}
	c.dec = NewDecoder(c.br, positive(s.MaxRequestSize, DefaultMaxRequestSize))
	return c
}

func (c *conn) serve() {
	defer c.srv.finishConn(c)
	idleTimeout := positive(c.srv.IdleTimeout, DefaultIdleTimeout)
	for {
		// SPEC 1.2: answer pipelined requests in order, with their replies
		// gathered into one write; flush before every wait for input.
		waiting := !c.dec.buffered()
		if waiting {
			if !c.flush() || !c.setIdle() {
				return
			}
			extendDeadline(&c.readDeadline, idleTimeout, c.rwc.SetReadDeadline)
		}
		req, err := c.dec.Next()
		if err != nil {
			c.fail(err)
			return
		}
		if waiting && !c.state.CompareAndSwap(stateIdle, stateActive) {
			return // Shutdown closed the connection while it was idle
		}
		// SPEC 1.1: a request is "<name> <key>", split at the first space.
		i := bytes.IndexByte(req, ' ')
		if i < 0 {
			c.fail(fmt.Errorf("%w: request without a space: %q", ErrMalformed, prefix(req)))
			return
		}
		if i == 0 {
			c.fail(fmt.Errorf("%w: request without a map name: %q", ErrMalformed, prefix(req)))
			return
		}
		if string(req[:i]) != c.name {
			c.name = string(req[:i])
		}
		key := string(req[i+1:])
		r, ok := c.handle(c.name, key)
		if !c.write(c.check(r, key)) || !ok || c.srv.closing.Load() {
			c.flush()
			return
		}
	}
}

// handle calls the handler; ok is false if it panicked.
func (c *conn) handle(name, key string) (r Reply, ok bool) {
	defer func() {
		if v := recover(); v != nil {
			c.srv.logger().Error("socketmap: handler panicked; closing connection",
				"remote", c.remote, "map", prefix(name), "key", prefix(key),
				"panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			r, ok = Temp("internal error"), false
		}
	}()
	return c.srv.Handler.ServeSocketmap(c.srv.ctx, name, key), true
}

// check replaces a reply that must not be sent.
func (c *conn) check(r Reply, key string) Reply {
	switch r.Word {
	case WordOK:
		if r.Data == "" {
			// SPEC 1.3: OK always carries data.
			c.srv.logger().Error("socketmap: handler returned OK without data",
				"remote", c.remote, "map", prefix(c.name), "key", prefix(key))
			return Temp("empty reply")
		}
	case WordNotFound, WordTemp, WordTimeout, WordPerm:
	default:
		c.srv.logger().Error("socketmap: handler returned an unknown reply word",
			"remote", c.remote, "map", prefix(c.name), "key", prefix(key), "word", prefix(string(r.Word)))
		return Temp("internal error")
	}
	if n, limit := r.encodedLen(), positive(c.srv.MaxReplySize, DefaultMaxReplySize); n >= limit {
		// SPEC 1.4: Postfix would refuse the reply.
		c.srv.logger().Error("socketmap: reply too large",
			"remote", c.remote, "map", prefix(c.name), "key", prefix(key), "size", n, "limit", limit)
		return Temp("reply too large")
	}
	return r
}

// write buffers the reply; a full buffer is flushed under a fresh deadline.
func (c *conn) write(r Reply) bool {
	c.out = AppendReply(c.out[:0], r)
	if len(c.out) > c.bw.Available() {
		c.setWriteDeadline()
	}
	if _, err := c.bw.Write(c.out); err != nil {
		c.srv.logger().Debug("socketmap: write failed", "remote", c.remote, "err", err)
		return false
	}
	return true
}

func (c *conn) flush() bool {
	if c.bw.Buffered() == 0 {
		return true
	}
	c.setWriteDeadline()
	if err := c.bw.Flush(); err != nil {
		c.srv.logger().Debug("socketmap: write failed", "remote", c.remote, "err", err)
		return false
	}
	return true
}

func (c *conn) setWriteDeadline() {
	extendDeadline(&c.writeDeadline, positive(c.srv.WriteTimeout, DefaultWriteTimeout), c.rwc.SetWriteDeadline)
}

// extendDeadline makes the deadline *d at least timeout away. A deadline
// nearer than that moves to timeout plus an eighth, so that it is set once
// per eighth of its timeout at most, not once per request: setting one
// updates a runtime timer, which costs as much as the rest of a cached
// lookup. A connection idle (or a write blocked) for timeout thus ends
// after between timeout and 9/8 of it. A read or write that needs no wait
// (a request already buffered) sets nothing.
func extendDeadline(d *time.Time, timeout time.Duration, set func(time.Time) error) {
	now := time.Now()
	if d.Sub(now) >= timeout {
		return
	}
	*d = now.Add(timeout + timeout/8)
	set(*d)
}

// setIdle marks the connection as waiting for a request. It returns false
// if the connection should close instead: the server is shutting down.
func (c *conn) setIdle() bool {
	return c.state.CompareAndSwap(stateActive, stateIdle) && !c.srv.closing.Load()
}

// fail ends the connection on a read error or a malformed request
// (SPEC 1.1), after sending the replies still buffered: SPEC 1.2 owes them
// to the pipelined requests that came before.
func (c *conn) fail(err error) {
	c.flush()
	log := c.srv.logger()
	var ne net.Error
	switch {
	case errors.Is(err, ErrMalformed):
		// SPEC 1.1: log and close this connection only.
		log.Warn("socketmap: malformed request; closing connection", "remote", c.remote, "err", err)
	case errors.Is(err, io.EOF), c.srv.closing.Load():
		// The client hung up, or Shutdown or Close closed the connection.
	case errors.As(err, &ne) && ne.Timeout():
		log.Debug("socketmap: idle timeout; closing connection", "remote", c.remote)
	default:
		log.Debug("socketmap: read failed; closing connection", "remote", c.remote, "err", err)
	}
}

// maxLogBytes bounds client-controlled text in log lines (SPEC 8.3).
const maxLogBytes = 64

func prefix[T string | []byte](b T) T {
	if len(b) > maxLogBytes {
		return b[:maxLogBytes]
	}
	return b
}

func positive[T int | time.Duration](v, def T) T {
	if v > 0 {
		return v
	}
	return def
}
