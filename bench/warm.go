package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"stsmap/socketmap"
)

// replyWords are the reply words counted by -warm and -cold, in report
// order; anything else counts as "other".
var replyWords = []socketmap.Word{socketmap.WordOK, socketmap.WordNotFound, socketmap.WordTemp, socketmap.WordTimeout, socketmap.WordPerm}

// wordCounts counts replies per reply word; the last slot is "other".
type wordCounts [6]int64

func (w *wordCounts) add(p []byte) {
	word, _, _ := strings.Cut(string(p), " ")
	i := slices.Index(replyWords, socketmap.Word(word))
	if i < 0 {
		i = len(replyWords)
	}
	w[i]++
}

func (w wordCounts) String() string {
	var b strings.Builder
	for i, n := range w {
		name := "other"
		if i < len(replyWords) {
			name = string(replyWords[i])
		}
		if n > 0 || i < 2 {
			fmt.Fprintf(&b, "%s %d  ", name, n)
		}
	}
	return strings.TrimSpace(b.String())
}

func (w wordCounts) asMap() map[string]int64 {
	m := map[string]int64{}
	for i, n := range w {
		if i < len(replyWords) {
			m[string(replyWords[i])] = n
		} else if n > 0 {
			m["other"] = n
		}
	}
	return m
}

// warmResult is what -warm measured.
type warmResult struct {
	Keys      int              `json:"keys"`
	Answered  int64            `json:"answered"`
	Replies   map[string]int64 `json:"replies"`
	Errors    int64            `json:"errors"`
	DurationS float64          `json:"duration_s"`
	LatencyUs latencyJSON      `json:"latency_us"`
	FirstErrs []string         `json:"first_errors,omitempty"`
	Conns     int              `json:"connections"`

	words    wordCounts
	duration time.Duration
	lat      [5]time.Duration // p50, p90, p99, p99.9, max
}

// runWarm sends every request of cfg.pool exactly once, over cfg.conns
// connections with one request in flight each, and counts the replies: the
// first contact with each key, which makes stsmap discover the domains that
// later runs find in its cache.
func runWarm(cfg config) warmResult {
	var (
		next  atomic.Int64
		errs  = errSink{max: cfg.maxErrShow}
		wg    sync.WaitGroup
		mu    sync.Mutex
		words wordCounts
		lats  []time.Duration
	)
	start := time.Now()
	for w := range cfg.conns {
		wg.Go(func() {
			ws, ls := warmWorker(cfg, w, &next, &errs)
			mu.Lock()
			defer mu.Unlock()
			for i, n := range ws {
				words[i] += n
			}
			lats = append(lats, ls...)
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	slices.Sort(lats)
	res := warmResult{
		Keys: len(cfg.pool), Answered: int64(len(lats)), Replies: words.asMap(), Errors: errs.n.Load(),
		DurationS: elapsed.Seconds(), FirstErrs: errs.msgs, Conns: cfg.conns, words: words, duration: elapsed,
	}
	for i, p := range []float64{50, 90, 99, 99.9, 100} {
		res.lat[i] = percentile(lats, p)
	}
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	res.LatencyUs = latencyJSON{us(res.lat[0]), us(res.lat[1]), us(res.lat[2]), us(res.lat[3]), us(res.lat[4])}
	return res
}

// warmWorker takes requests from the shared index next until none is
// left or its connection fails.
func warmWorker(cfg config, id int, next *atomic.Int64, errs *errSink) (wordCounts, []time.Duration) {
	var words wordCounts
	var lats []time.Duration
	netw, a := network(cfg.addr)
	c, err := net.DialTimeout(netw, a, cfg.timeout)
	if err != nil {
		errs.add(id, err)
		return words, lats
	}
	defer c.Close()
	br := bufio.NewReaderSize(c, 16<<10)
	dec := socketmap.NewDecoder(br, maxReply)
	for {
		i := next.Add(1) - 1
		if i >= int64(len(cfg.pool)) {
			return words, lats
		}
		r := &cfg.pool[i]
		start := time.Now()
		c.SetDeadline(start.Add(cfg.timeout))
		if _, err := c.Write(r.wire); err != nil {
			errs.add(id, fmt.Errorf("writing request: %w", err))
			return words, lats
		}
		p, err := dec.Next()
		if err != nil {
			errs.add(id, fmt.Errorf("reading reply: %w", err))
			return words, lats
		}
		lats = append(lats, time.Since(start))
		words.add(p)
		if err := checkReply(p, r.class, cfg.expect); err != nil {
			errs.add(id, err)
		}
	}
}

func printWarm(w io.Writer, r warmResult) {
	fmt.Fprintf(w, "warm         %d keys over %d connections, each key once\n", r.Keys, r.Conns)
	fmt.Fprintf(w, "answered     %d\n", r.Answered)
	fmt.Fprintf(w, "replies      %s\n", r.words)
	fmt.Fprintf(w, "errors       %d\n", r.Errors)
	rate := 0.0
	if r.duration > 0 {
		rate = float64(r.Answered) / r.duration.Seconds()
	}
	fmt.Fprintf(w, "duration     %.3fs (%.0f keys/s)\n", r.DurationS, rate)
	fmt.Fprintf(w, "latency      p50 %v  p90 %v  p99 %v  p99.9 %v  max %v\n", r.lat[0], r.lat[1], r.lat[2], r.lat[3], r.lat[4])
	for _, e := range r.FirstErrs {
		fmt.Fprintf(w, "error: %s\n", e)
	}
}
