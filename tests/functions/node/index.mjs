// A handler written for AWS Lambda's Node.js runtime, run unchanged through AWS's
// runtime interface client (aws-lambda-ric). Each instance appends its pid to
// $STARTS_FILE when it starts.
import { appendFileSync } from "node:fs";

if (process.env.STARTS_FILE) {
  appendFileSync(process.env.STARTS_FILE, `${process.pid}\n`);
}

export const handler = async (event, context) => {
  const enteredUs = Math.round((performance.timeOrigin + performance.now()) * 1000);
  const data = event.data ?? {};
  if (data.action === "raise") {
    throw new TypeError(`bad input: ${data.value}`);
  }
  return {
    echo: data,
    event_id: event.id,
    function: context.functionName,
    memory: context.memoryLimitInMB,
    arn: context.invokedFunctionArn,
    request_id: context.awsRequestId,
    pid: process.pid,
    runtime: "node",
    entered_us: enteredUs,
  };
};
